#!/bin/bash
# Operator-feedback round trip on real data (issue 35): train UCAD on hazelnut_toy + pcb, predict pcb's test
# images at decision.target_fpr=$TF, mark 5 false-rejected good images good and 3 passed defects defect, run
# `contad feedback apply`, predict again and count decisions before/after.
# Reads test labels (test/good vs test/defect pick the verdicts, as an operator would): a report, never used to
# choose a default.
# usage: benchmarks/feedback_round_trip.sh WORKDIR [key=value ...]   (env: DATA=../shared/data/real-ad, TF=0.2)
set -eu
W=$(realpath -m "$1"); shift
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 GX_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1
D=$(realpath "${DATA:-../shared/data/real-ad}"); TF=${TF:-0.2}
C=".venv/bin/python -m flows.cli"
O="method=ucad data.root=$D data.products=hazelnut_toy,pcb banks.store_dir=$W/banks tracking.uri=sqlite:///$W/mlflow.db masks.cache_dir=$W/masks eval.overlays_per_task=0 $*"
mkdir -p "$W"
[ -f "$W/banks/CURRENT" ] || $C run --out "$W/run" $O > "$W/run.log" 2>&1
P="$O decision.target_fpr=$TF"
ids() { .venv/bin/python -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(' '.join([x['prediction_id'][:16] for x in r if x['decision']==sys.argv[2]][:int(sys.argv[3])]))" "$@"; }
for s in good defect; do $C predict "$D/pcb/test/$s" --bank "$W/banks" --out "$W/before_$s" $P > /dev/null 2>&1; done
$C predict "$D/hazelnut_toy/test" --bank "$W/banks" --out "$W/before_hazelnut" $P > /dev/null 2>&1
$C feedback $(ids "$W/before_good/predictions.jsonl" NG 5) --as good --product pcb --by operator1 --predictions "$W/before_good/predictions.jsonl" $P
$C feedback $(ids "$W/before_defect/predictions.jsonl" OK 3) --as defect --product pcb --by operator2 --predictions "$W/before_defect/predictions.jsonl" $P
/usr/bin/time -f "feedback apply: %e s wall" $C feedback apply --out "$W/apply" $P 2>&1 | grep -v " INFO \|^$" || true
for s in good defect; do $C predict "$D/pcb/test/$s" --bank "$W/banks" --out "$W/after_$s" $P > /dev/null 2>&1; done
$C predict "$D/hazelnut_toy/test" --bank "$W/banks" --out "$W/after_hazelnut" $P > /dev/null 2>&1
$C feedback list $P
.venv/bin/python - "$W" <<'PY'
import json, sys
w = sys.argv[1]
rows = lambda d: [json.loads(line) for line in open(f"{w}/{d}/predictions.jsonl")]
ng = lambda d: sum(r["decision"] == "NG" for r in rows(d))
learned = [r for r in rows("before_good") if r["decision"] == "NG"][:5]
after = {r["prediction_id"]: r for r in rows("after_good")}
print("the 5 learned false rejects now:", [(after[r["prediction_id"]]["decision"], round(after[r["prediction_id"]]["score"], 4)) for r in learned])
same = sorted((r["path"], r["score"]) for r in rows("before_hazelnut")) == sorted((r["path"], r["score"]) for r in rows("after_hazelnut"))
print("hazelnut_toy scores bit-identical:", same)
print(f"pcb good decided NG: {ng('before_good')} -> {ng('after_good')} of {len(rows('after_good'))}")
print(f"pcb defects decided OK (escapes): {len(rows('before_defect')) - ng('before_defect')} -> {len(rows('after_defect')) - ng('after_defect')} of {len(rows('after_defect'))}")
result = json.load(open(f"{w}/apply/feedback_apply.json"))
print("gate:", "passed" if result["gate"]["passed"] else result["gate"]["reasons"], "| checked:", "; ".join(result["gate"]["checked"]))
how = (json.load(open(f"{w}/banks/versions/{result['bank_version']}/manifest.json")).get("feedback") or {}).get("how") or {}
print("share of each image's patches learned:", sorted(round(v["share"], 4) for v in how.values()), "rows:", sum(v["rows_added"] for v in how.values()))
PY
