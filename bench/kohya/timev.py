"""timev.py -o FILE CMD...: run CMD and write to FILE the two lines of GNU `time -v` that parse_run.py reads
(elapsed wall time, largest resident set of the process tree), where /usr/bin/time is missing (a lent GPU
machine). Exits with CMD's status."""
import resource, subprocess, sys, time

assert sys.argv[1] == "-o" and len(sys.argv) > 3, __doc__
out, cmd = sys.argv[2], sys.argv[3:]
start = time.monotonic()
rc = subprocess.call(cmd)
elapsed = time.monotonic() - start
with open(out, "w") as f:
    f.write(f"\tElapsed (wall clock) time (h:mm:ss or m:ss): {int(elapsed // 60)}:{elapsed % 60:05.2f}\n")
    f.write(f"\tMaximum resident set size (kbytes): {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\n")
sys.exit(rc)
