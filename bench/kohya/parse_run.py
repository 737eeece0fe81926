"""parse_run.py SIDE LOG TIMEFILE N: the numbers of one run of SIDE (kohya or sdtrain) from tslog.py's LOG and
/usr/bin/time -v's TIMEFILE. Prints: wall_s s_per_step peak_rss_GiB first_step_s; writes steps.txt beside LOG.
  first_step_s: launch -> the progress bar first shows 1/N (the bar is updated right after the optimizer step)
  s_per_step:   (time bar first shows N/N - time it first shows 1/N) / (N-1)  (steady state: steps 2..N)
  wall_s:       launch -> process exit (includes saving the LoRA and, on sdtrain, its final checkpoint)
  peak_rss:     'Maximum resident set size' of /usr/bin/time -v (largest process of the tree)."""
import re, sys
from pathlib import Path

side, log_path, time_path, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
bar = {
    # kohya: tqdm(desc="steps"), e.g. 'steps:  33%|###3   | 1/3 [00:05<00:10,  5.0s/it, avr_loss=0.1]'
    "kohya": re.compile(r"^steps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) \["),
    # sdtrain: tqdm(unit="step"), no desc, e.g. ' 33%|###3   | 1/3 [00:05<00:10,  5.0s/step, epoch=0, loss=0.1]'
    "sdtrain": re.compile(r"^\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[[^\]]*step"),
}[side]
first_seen, exit_t, rc = {}, None, None
caching, cached = False, None  # how many images each side VAE-encodes before step 1
for line in open(log_path, encoding="utf-8"):
    if line.startswith("#"):
        continue
    t, _, text = line.rstrip("\n").lstrip().partition(" ")
    m = re.match(r"# exit (-?\d+)$", text)
    if m:
        exit_t, rc = float(t), int(m.group(1))
        continue
    if "caching latents" in text.lower():
        caching = True
    step = bar.match(text)
    if step:
        caching = False
        if int(step.group(2)) == n:
            first_seen.setdefault(int(step.group(1)), float(t))
    elif caching and (m := re.search(r"\| *(\d+)/(\d+) \[", text)):
        cached = int(m.group(2))
rss_kb = None
for line in open(time_path, encoding="utf-8"):
    if "Maximum resident set size" in line:
        rss_kb = int(line.split(":")[-1])
fmt = lambda x, d=2: "nan" if x is None else f"{x:.{d}f}"
t1, tn = first_seen.get(1), first_seen.get(n)
sps = (tn - t1) / (n - 1) if (t1 is not None and tn is not None and n > 1) else None
# Every step's own time (bar k-1 -> bar k; step 1 from launch), for medians and outliers.
marks = [0.0] + [first_seen[k] for k in range(1, n + 1) if k in first_seen]
(log_path.parent / "steps.txt").write_text("".join(f"{k} {b - a:.3f}\n" for k, (a, b) in enumerate(zip(marks, marks[1:]), start=1)))
print(f"latents cached before step 1: {cached} images", file=sys.stderr)
if rc != 0 or tn is None:
    print(f"warning: rc={rc}, steps seen {sorted(first_seen)[-3:] if first_seen else []} of {n}", file=sys.stderr)
print(fmt(exit_t, 1), fmt(sps, 3), fmt(rss_kb * 1024 / 2**30 if rss_kb else None, 2), fmt(t1, 1))
