import sys

try:
    from .cli import Terminated, ignore_termination, main
except KeyboardInterrupt:  # SIGINT while the modules load: one line, no traceback
    print("caffe-compress: error: interrupted (SIGINT)", file=sys.stderr)
    sys.exit(130)

try:
    code = main()
except KeyboardInterrupt:  # a second SIGINT while the first one unwinds
    code = 130
except Terminated as exc:  # SIGTERM/SIGHUP after main's own handlers
    code = 128 + exc.signum
# a late SIGINT/SIGTERM/SIGHUP while the interpreter exits: no "Exception ignored in threading._shutdown",
# no death by signal (the exit code stays the run's)
ignore_termination()
sys.exit(code)
