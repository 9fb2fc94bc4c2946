import sys

from rtgate.cli import main

main(["gateway", *sys.argv[1:]])
