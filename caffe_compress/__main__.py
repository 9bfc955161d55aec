import signal
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # SIGINT while the modules load: one line, no traceback
    print("caffe-compress: error: interrupted (SIGINT)", file=sys.stderr)
    sys.exit(130)

try:
    code = main()
except KeyboardInterrupt:  # a second SIGINT while the first one unwinds
    code = 130
signal.signal(signal.SIGINT, signal.SIG_IGN)  # no "Exception ignored in threading._shutdown" on a late one
sys.exit(code)
