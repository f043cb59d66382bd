#!/bin/bash
# the sweep: every config in this folder at once, 2 threads each, on the device machine's CPU cores
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nproc; python3 -c "import torch, timm, transformers, soundfile; print(torch.__version__, timm.__version__, transformers.__version__)"
for c in bench/sweeps/vision-adapter/*.json; do n=$(basename $c .json); OMP_NUM_THREADS=2 timeout ${LIMIT:-500} python3 -m mmdiff train --config $c --fresh --no-progress > $OUT/$n.log 2>&1 & done
wait
for f in $OUT/*.log; do echo "== $f"; grep -a "val_\|Error\|error" $f | tail -4; done
