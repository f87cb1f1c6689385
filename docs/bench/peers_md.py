"""A `bench --baseline peers --json` file as the markdown table of docs/benchmarks.md: ratio peer ÷ ours per cell,
median of the processes (lowest–highest), bold under 1.2×; with --compile columns, the compiled ratio too.

    python docs/bench/peers_md.py docs/bench/peers_cpu_1t_s6.json"""
import json
import sys

d = json.load(open(sys.argv[1]))
peers = d["peers"]
rows: dict = {}
for r in d["rows"]:
    rows.setdefault(r["peer"], {})[(r["shape"], r["mode"])] = r
compiled = any(r.get("ratio_compiled") for r in d["rows"])


def cell(r, key="ratio"):
    if not r or r.get(key) is None:
        return "—"
    v = f"{r[key]:.2f}×"
    if key == "ratio" and r.get("ratio_lo") is not None:
        v += f" ({r['ratio_lo']:.2f}–{r['ratio_hi']:.2f})"
    return f"**{v}**" if r[key] < 1.2 else v


head = ["peer", "public module → our block"]
shapes_all = []
for cells in rows.values():
    for s, _ in cells:
        if s not in shapes_all:
            shapes_all.append(s)
cols = []
for cells in rows.values():
    for s, m in cells:
        side = "x".join(s.split("x")[2:])
        if (side, m) not in cols:
            cols.append((side, m))
dims2 = [c for c in cols if c[0].count("x") == 1]
key = lambda c: (int(c[0].split("x")[0]), c[1] != "fwd")  # noqa: E731
dims2.sort(key=key)
head += [f"{s.split('x')[0]}² {m}" for s, m in dims2]
if compiled:
    head += [f"{s.split('x')[0]}² {m} compiled" for s, m in dims2]
print("| " + " | ".join(head) + " |")
print("| " + " | ".join("---" for _ in head) + " |")
for name, cells in rows.items():
    by_side = {("x".join(s.split("x")[2:]), m): r for (s, m), r in cells.items()}
    three_d = [k for k in by_side if k[0].count("x") == 2]
    vals = [cell(by_side.get(c)) for c in dims2]
    if three_d:  # a 3-D peer: its clip cells in the first columns, the clip named
        clip = three_d[0][0]
        vals = [cell(by_side.get((clip, m))) for m in ("fwd", "fwd+bwd")] + ["—"] * (len(dims2) - 2)
        name = f"{name} ({clip.replace('x', '×')})"
    if compiled:
        vals += [cell(by_side.get(c), "ratio_compiled") for c in dims2]
    label = peers[name.split(" ")[0]]
    print(f"| {name} | `{label['module']}` → {label['ours']} | " + " | ".join(vals) + " |")
