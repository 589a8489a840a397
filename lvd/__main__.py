from lvd.cli import entry

entry()
