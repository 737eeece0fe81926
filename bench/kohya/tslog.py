"""tslog.py LOG -- CMD...: run CMD with stdout+stderr merged into one pipe; write every line to LOG
prefixed with the seconds since launch at which its text arrived. Lines end at '\n' OR '\r' (tqdm
redraws its bar with '\r' and no newline, so a bar state is stamped when its bytes arrive, not when
the next redraw terminates it). Last line of LOG: '<t> # exit <rc>'. Exits with CMD's status."""
import os, re, subprocess, sys, time

log_path, sep, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
assert sep == "--" and cmd, __doc__
t0 = time.monotonic()
proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
fd = proc.stdout.fileno()
pending, pending_t = b"", 0.0
with open(log_path, "w", encoding="utf-8") as log:
    log.write(f"# launched {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")

    def emit(text: bytes, t: float) -> None:
        if text.strip():
            log.write(f"{t:10.3f} {text.decode('utf-8', 'replace')}\n")

    while True:
        chunk = os.read(fd, 65536)
        now = time.monotonic() - t0
        if not chunk:
            break
        pieces = re.split(rb"[\r\n]", chunk)
        # The first piece continues the pending line; a piece is stamped with the arrival of its last byte.
        pieces[0] = pending + pieces[0]
        first_t = now if pieces[0][len(pending):] else pending_t
        if len(pieces) == 1:
            pending, pending_t = pieces[0], first_t
            continue
        emit(pieces[0], first_t)
        for piece in pieces[1:-1]:
            emit(piece, now)
        pending, pending_t = pieces[-1], now
    emit(pending, pending_t)
    rc = proc.wait()
    log.write(f"{time.monotonic() - t0:10.3f} # exit {rc}\n")
sys.exit(rc)
