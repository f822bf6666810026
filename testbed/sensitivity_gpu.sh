#!/usr/bin/env bash
# Issue 17's study on one H100, one command per regime (train, measure every expert, grid):
#
#   MOEQ_DATA=.gpu/data DEADLINE=500 bash testbed/sensitivity_gpu.sh $OUT mixtral
#   MOEQ_DATA=.gpu/data DEADLINE=500 bash testbed/sensitivity_gpu.sh $OUT mixtral-top1 mixtral-noaux
#   MOEQ_DATA=.gpu/data DEADLINE=560 bash testbed/sensitivity_gpu.sh $OUT switch     # carry .whl (rouge_score): 516 s
#
# Mixtral models train 500 steps unless STEPS says otherwise (testbed/sensitivity.sh says why).
# Every stage prints its seconds and its processes' "stage ..." lines (logs.tgz has the logs).
# Stops its measurement and grid processes at DEADLINE seconds (default 540) so that the results
# come back within a 10-minute command; the same command again on the warm machine resumes them
# (trained models and finished rows are kept in runs/). OUT receives testbed/sensitivity.sh's
# folders and logs.tgz. Then here, with matplotlib, the plots and tables from the returned files:
#   python expert_sensitivity.py --model runs/mixtral-gpu-s{0,1,2}/trained --dataset x --out OUT/mixtral --report_only
#   python reproduce_tables.py --model runs/mixtral-gpu-s{0,1,2}/trained --router_reference ... \
#     --sensitivity_file ... --dataset x --out OUT/mixtral/grid --report_only
set -uo pipefail
python -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || { echo "pip install -e . failed"; exit 1; }
# wheels the GPU image lacks (rouge_score and its absl / nltk / six for the Switch scores), where
# the command carries a .whl folder: ../shared/tools/gpu-wheels.sh absl-py==2.1.0 six==1.17.0
if compgen -G ".whl/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/moeq-site .whl/*.whl > /dev/null 2>&1 \
    || { echo "installing .whl/*.whl failed"; exit 1; }
  export PYTHONPATH=/tmp/moeq-site${PYTHONPATH:+:$PYTHONPATH}
fi
out=${1:?usage: testbed/sensitivity_gpu.sh OUT REGIME...}
shift
DEADLINE=${DEADLINE:-540} bash testbed/sensitivity.sh gpu "$out" "$@"
tar czf "$out/logs.tgz" logs
