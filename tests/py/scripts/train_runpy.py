# The training code runs through runpy.run_path from a launcher that never imports torch itself.
import os
import runpy
import sys

sys.argv = [sys.argv[0]] + sys.argv[1:]
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_top.py"), run_name="__main__")
