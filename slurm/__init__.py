"""The cluster side in Python: `lvd submit` (submitit) and the sharding job array's slices and merge.
The sbatch templates and launch.sh beside this package run the same jobs without Python."""
