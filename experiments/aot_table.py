"""Will every pod recipe fit its chips? `python -m clipjax.aot` for each recipe × topology, one JSON line each, and
the Markdown table of experiments/AOT.md.

    pip install -e ".[tpu]"                           # libtpu: the TPU compiler, no TPU needed
    python experiments/aot_table.py                   # → results/aot-<date>.jsonl and the table (≈ 1-15 min a row)
    python experiments/aot_table.py --only vit_b32    # some rows
    python experiments/aot_table.py --table results/aot-2026-12-06.jsonl   # the table of a recorded run

Each row runs in its own process (a failed compile cannot poison the next). A row that does not fit is recorded with
the compiler's figure and the refusal line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
GiB = 1 << 30

# (name, config, topology, num_slices, overrides): the recipes as shipped on their named targets, plus the settings
# they were moved from (kept to show why)
ROWS = (
    ("vit_b32", "vit_b32.py", "v5e:16x16", 1, ()),
    ("vit_b32 × 2 slices", "vit_b32.py", "v5e:16x16", 2, ()),
    ("vit_b16", "vit_b16.py", "v5e:16x16", 1, ()),
    ("vit_l14", "vit_l14.py", "v5e:16x16", 1, ()),
    ("vit_l14, remat dots_no_batch (before)", "vit_l14.py", "v5e:16x16", 1, ("--config.model.remat=dots_no_batch",)),
    ("rn50", "rn50.py", "v5e:16x16", 1, ()),
)


def run_row(config: str, topology: str, num_slices: int, overrides: tuple[str, ...]) -> dict:
    cmd = [sys.executable, "-m", "clipjax.aot", f"--config={ROOT / 'configs' / config}", f"--topology={topology}",
           f"--num_slices={num_slices}", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1]) if lines else {"topology": topology, "num_slices": num_slices}
    out["exit_status"] = r.returncode
    out["error"] = next((ln for ln in r.stderr.splitlines() if ln.startswith("error:")), None)
    return out


def table(rows: list[dict]) -> str:
    head = ("| recipe | topology | mesh | per chip: arguments / temporaries / total (GiB) | HBM used | fits | compile "
            "(s) | collectives (AG / RS / AR / A2A / CP) |\n|---|---|---|---|---|---|---|---|")
    out = [head]
    for r in rows:
        b = r.get("bytes_per_chip") or {}
        gib = (lambda v: f"{v / GiB:.2f}" if v is not None else "–")
        total = r.get("bytes_per_chip_total")
        used = f"{total / r['hbm_bytes_per_chip']:.0%}" if total and r.get("hbm_bytes_per_chip") else "–"
        c = r.get("collectives") or {}
        coll = " / ".join(str(c.get(k, "–")) for k in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                                                         "collective-permute"))
        mesh = " × ".join(f"{k} {v}" for k, v in (r.get("mesh") or {}).items() if v > 1)
        topo = r["topology"] + (f" × {r['num_slices']}" if r.get("num_slices", 1) > 1 else "")
        out.append(f"| {r['name']} | {topo} | {mesh} | {gib(b.get('arguments'))} / {gib(b.get('temporaries'))} / "
                   f"{'≥ ' if not b and total else ''}{gib(total)} | {used} | {'yes' if r.get('fits') else '**no**'} | "
                   f"{r.get('compile_s', '–')} | {coll if c else '–'} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="rows whose name starts with one of these")
    ap.add_argument("--table", help="print the table of a recorded .jsonl and stop")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(ln) for ln in pathlib.Path(args.table).read_text().splitlines() if ln.strip()]))
        return
    path = HERE / "results" / f"aot-{datetime.date.today().isoformat()}.jsonl"
    rows = []
    for name, config, topology, slices, overrides in ROWS:
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        print(f"{name} on {topology}{f' × {slices}' if slices > 1 else ''}…", file=sys.stderr, flush=True)
        row = {"name": name, **run_row(config, topology, slices, overrides),
               "date": datetime.date.today().isoformat()}
        rows.append(row)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  fits={row.get('fits')} compile_s={row.get('compile_s')}", file=sys.stderr, flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
