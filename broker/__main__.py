import sys

from rtgate.cli import main

main(["broker", *sys.argv[1:]])
