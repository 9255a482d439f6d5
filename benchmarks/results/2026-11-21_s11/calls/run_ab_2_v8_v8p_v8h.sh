#!/bin/bash
# v8 = single-tile items when tile costs are equal (56 B spill at 192 rows); v8p = v8's code with pairs forced
# (code-generation control); v8h = consecutive-tile pairs + single-tile last round (124 B spill at 192 rows).
S=.bwdtmp/s18
OUT=$OUT FWD_ONLY="bf16_64x64 bf16_128x128" ROUNDS=${ROUNDS:-5} bash cuda/tests/run_fwd_ab.sh $S/main $S/v8 $S/v8p $S/v8h 2>&1 | tail -30
for v in main v8 v8h; do
  cuobjdump -sass /tmp/fwd_ab_build/$v/fwd_check > /tmp/sass_$v.txt 2>/dev/null
  python3 - "$v" <<'PY'
import re,sys
v=sys.argv[1]; txt=open(f"/tmp/sass_{v}.txt").read()
for fn in re.split(r"\n\s+Function : ", txt)[1:]:
    name=fn.split("\n",1)[0]
    if "fwd_kernel" not in name: continue
    n=lambda op: len(re.findall(r"\b"+op+r"\b", fn))
    print(v, name[:60], "...", name[-40:], "STL", n("STL"), "LDL", n("LDL"), "HGMMA", n("HGMMA"), "MUFU.EX2", len(re.findall(r"MUFU\.EX2", fn)), "lines", fn.count("\n"))
PY
done
B=/tmp/fwd_ab_build/v8h
timeout 200 $B/fwd_check --no-bench > $OUT/check_v8h.txt 2>&1; echo "check rc=$? $(grep correctness $OUT/check_v8h.txt)"
for tool in memcheck racecheck; do
  timeout 100 compute-sanitizer --tool $tool $B/fwd_check --tiny --no-bench --filter bf16_64x64 2>&1 | tail -1 | sed "s/^/$tool /"
done
