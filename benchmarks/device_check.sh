#!/usr/bin/env bash
# The one device check for a GPU machine: parity with Hugging Face's PyTorch T5
# and our distillation step against PyTorch's, as JSON lines.
#
#   bash benchmarks/device_check.sh [--smoke] [--out DIR]
#
# Writes DIR/results.jsonl (every benchmark's JSON lines, then one
# "device_check_summary" line) and DIR/device_check.log (commands, stderr,
# seconds per step). DIR defaults to $OUT (the device tool's folder), else
# ./device_check_out. --smoke runs the same steps with tiny shapes (one step
# shape, no explicit-attention rerun) on any machine, CPU included (the test
# suite does), so the script is known to work before a GPU is lent. Full run:
# about 5 minutes on one H200 (estimated: never run on one yet).
#
# Installs nothing. It needs jax, flax, optax, orbax-checkpoint, torch,
# transformers, safetensors, sentencepiece (GPU images have them) and the
# pure-Python gin-config, which they lack: carry its wheel in the working tree,
#   pip download gin-config==0.5.0 --no-deps -d benchmarks/wheels
# (benchmarks/wheels/ is git-ignored); every wheel there goes on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
out="${OUT:-device_check_out}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1; shift ;;
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$1' (use --smoke, --out DIR)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-python3}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for wheel in benchmarks/wheels/*.whl; do
  [[ -e "$wheel" ]] && PYTHONPATH="$PYTHONPATH:$PWD/$wheel"
done
export PYTHONPATH TF_CPP_MIN_LOG_LEVEL=2 TRANSFORMERS_VERBOSITY=error

missing=$("$PYTHON" - <<'EOF'
import importlib.util
need = ["jax", "flax", "optax", "orbax", "gin", "torch", "transformers", "safetensors",
        "sentencepiece"]
print(" ".join(name for name in need if importlib.util.find_spec(name) is None))
EOF
)
if [[ -n "$missing" ]]; then
  echo "device_check.sh: cannot import: $missing. gin is carried as a wheel:" \
       "pip download gin-config==0.5.0 --no-deps -d benchmarks/wheels (on a machine with" \
       "network), then run this again." >&2
  exit 2
fi

mkdir -p "$out"
results="$out/results.jsonl"
log="$out/device_check.log"
: >"$results"
: >"$log"
failures=0

# run NAME COMMAND...: appends the command's JSON lines to results.jsonl; a
# failing step is recorded as an error line and the others still run.
run() {
  local name="$1" start=$SECONDS status=0
  shift
  echo "== $name: $*" >>"$log"
  "$@" >"$out/$name.stdout" 2>>"$log" || status=$?
  cat "$out/$name.stdout" >>"$log"
  grep '^{' "$out/$name.stdout" >>"$results" || true
  if [[ $status -ne 0 ]]; then
    echo "{\"benchmark\": \"$name\", \"error\": \"exit $status, see device_check.log\"}" >>"$results"
    failures=$((failures + 1))
  fi
  rm -f "$out/$name.stdout"
  echo "== $name: exit $status after $((SECONDS - start)) s" >>"$log"
}

run environment "$PYTHON" - <<'EOF'
import json, platform
import flax, jax, optax, orbax.checkpoint, torch, transformers
print(json.dumps({"benchmark": "environment", "python": platform.python_version(),
                  "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                  "orbax_checkpoint": orbax.checkpoint.__version__, "torch": torch.__version__,
                  "transformers": transformers.__version__, "backend": jax.default_backend(),
                  "devices": [d.device_kind for d in jax.devices()],
                  "torch_cuda": torch.cuda.is_available()}))
EOF

step=(benchmarks/distill_step.py --teacher_dtype bfloat16 --dtype bfloat16 --recipe miniend_d)
if [[ $smoke -eq 1 ]]; then
  run parity "$PYTHON" benchmarks/hf_parity.py --tiny --batch 2 --inputs 40 --targets 8
  step+=(--teacher t5-v1_1-tiny --student 1L-32H --steps 1)
  # One shape: the second would run the same code again.
  run distill_long "$PYTHON" "${step[@]}" --batch 2 --inputs 32 --targets 8 --impl both
  # (The explicit-attention rerun is the same code on a CPU: full runs only.)
  run vocab_loss_memory "$PYTHON" benchmarks/vocab_loss_memory.py --batch 4 --targets 64 \
    --student_width 32 --teacher_width 64 --vocab 2048 --chunk_size 8
else
  run parity "$PYTHON" benchmarks/hf_parity.py --models t5-base,t5-v1_1-base --batch 8 \
    --inputs 512 --targets 114
  step+=(--teacher t5-v1_1-base --student 6L-384H --steps 10)
  run distill_long "$PYTHON" "${step[@]}" --batch 64 --inputs 512 --targets 114 --impl both
  run distill_short "$PYTHON" "${step[@]}" --batch 128 --inputs 128 --targets 32 --impl both
  run distill_long_explicit "$PYTHON" "${step[@]}" --batch 64 --inputs 512 --targets 114 \
    --impl jax --attention explicit
  # What the fused output head saves on the device's own compiler (seconds).
  run vocab_loss_memory "$PYTHON" benchmarks/vocab_loss_memory.py
fi

"$PYTHON" - "$results" "$failures" <<'EOF' | tee -a "$results"
import json, sys
lines = [json.loads(line) for line in open(sys.argv[1])]
parity = {r["model"]: r["logits_rel_error"] for r in lines if r.get("benchmark") == "hf_parity"}
ratios = [r for r in lines if r.get("benchmark") == "distill_step_ratio"]
explicit = [r for r in lines if r.get("benchmark") == "distill_step" and r["impl"] == "jax"
            and r.get("attention") == "explicit"]
print(json.dumps({
    "benchmark": "device_check_summary", "failures": int(sys.argv[2]),
    "parity_logits_rel_error": parity,
    "shapes": [{"batch": r["batch"], "inputs": r["inputs"], "targets": r["targets"],
                "ours_over_pytorch_tokens_per_s": r["jax_over_torch_throughput"],
                "ours_mfu": r["jax_mfu"], "pytorch_mfu": r["torch_mfu"]} for r in ratios],
    "explicit_attention_step_s": [r["step_s"] for r in explicit],
    "loss_temp_mb": {f'{r["vocab"]}/{r["head"]}': r["temp_mb"] for r in lines
                     if r.get("benchmark") == "vocab_loss_memory"}}))
EOF
echo "device_check.sh: results in $results, log in $log" >&2
exit $((failures > 0))
