#!/usr/bin/env bash
# End-to-end check of `patchforcing eval --features inception` (FID / sFID / IS / precision /
# recall through torch-fidelity's InceptionV3), in a separate virtual environment.
#
# Why a separate environment: torch-fidelity needs torchvision, and no torchvision build installs
# beside the project's pinned CPU torch. This script installs torch + torchvision + torch-fidelity
# into their own venv. NOTE: the default torch/torchvision wheels are the CUDA builds, about
# 5.5 GB on disk (they run on a CPU too); the venv is kept and reused by later runs.
#
# It needs no network access beyond the package index and no Inception weights: it writes a
# randomly initialised weights file with the shapes torch-fidelity's InceptionV3 expects
# (`patchforcing.evaluation.random_inception_weights`), so the numbers it prints are meaningless;
# it checks the plumbing (loading, the spatial-feature hook, statistics, the ADM reference path,
# the JSON output), not the values. Takes a few minutes on a 2-core CPU after the install.
#
# Usage:  scripts/check-inception-stack.sh
# Environment (all optional):
#   PF_INCEPTION_VENV   venv to create or reuse            (default /tmp/pf-inception-venv)
#   PF_TORCH_SPEC       torch requirement                  (default torch==2.14.1)
#   PF_TORCHVISION_SPEC torchvision requirement            (default torchvision==0.29.1)
#   PF_FIDELITY_SPEC    torch-fidelity requirement         (default torch-fidelity)
#   PYTHON              interpreter that creates the venv  (default python3)
#   PF_WORKDIR          where the test files go            (default: a new temporary folder)
set -euo pipefail

VENV=${PF_INCEPTION_VENV:-/tmp/pf-inception-venv}
TORCH_SPEC=${PF_TORCH_SPEC:-torch==2.14.1}
TORCHVISION_SPEC=${PF_TORCHVISION_SPEC:-torchvision==0.29.1}
FIDELITY_SPEC=${PF_FIDELITY_SPEC:-torch-fidelity}
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${PF_WORKDIR:-$(mktemp -d -t pf-inception-check.XXXXXX)}
mkdir -p "$WORK"
PY="$VENV/bin/python"

say() { printf '== %s\n' "$*"; }

if [ ! -x "$PY" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if "$PY" -c "import torch, torchvision, torch_fidelity" 2>/dev/null; then
    say "reusing $VENV ($("$PY" -c 'import torch, torchvision, torch_fidelity as f; print("torch", torch.__version__, "torchvision", torchvision.__version__, "torch-fidelity", f.__version__)'))"
else
    say "installing $TORCH_SPEC $TORCHVISION_SPEC (CUDA builds: ~5.5 GB) and $FIDELITY_SPEC into $VENV"
    "$PY" -m pip install -q "$TORCH_SPEC" "$TORCHVISION_SPEC"
    "$PY" -m pip install -q "$FIDELITY_SPEC" "$TORCH_SPEC" "$TORCHVISION_SPEC"
fi
say "installing patchforcing from $REPO (editable, --no-deps) and its light dependencies"
"$PY" -m pip install -q numpy "safetensors>=0.4" "pyyaml>=6.0" "tqdm>=4.64" "pillow>=9.0"
"$PY" -m pip install -q --no-deps -e "$REPO"

say "writing random Inception weights and test images to $WORK"
"$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path

import numpy as np

from patchforcing.data import SyntheticShapes
from patchforcing.evaluation import InceptionFeatures, extract_features, feature_statistics, open_images
from patchforcing.evaluation import random_inception_weights

work = Path(sys.argv[1])
weights = random_inception_weights(work / "inception-random.pth", seed=0)


def shapes(n, seed):
    return np.clip(SyntheticShapes(size=32, length=n, seed=seed).render(range(n)) * 255 + 0.5, 0, 255).astype(np.uint8)


samples, ref = shapes(48, 1), shapes(64, 2)
np.savez(work / "samples.npz", arr_0=samples, labels=np.arange(48) % 8)
np.savez(work / "ref-images.npz", arr_0=ref)
# an ADM-style reference batch: images + mu/sigma + mu_s/sigma_s, here in the random network's space
fx = InceptionFeatures(weights)
f = extract_features(open_images(ref), fx, batch_size=16)
assert f["spatial"] is not None and f["spatial"].shape[1] == 7 * 17 * 17, f["spatial"]
assert f["pool"].shape[1] == 2048 and f["logits"].shape[1] == 1008
mu, sigma = feature_statistics(f["pool"])
mu_s, sigma_s = feature_statistics(f["spatial"])
np.savez(work / "ref-adm.npz", arr_0=ref, mu=mu.numpy(), sigma=sigma.numpy(), mu_s=mu_s.numpy(), sigma_s=sigma_s.numpy())
print("features:", {k: tuple(v.shape) for k, v in f.items()})
EOF

run_eval() {
    "$VENV/bin/patchforcing" eval "$WORK/samples.npz" --ref "$1" --features inception \
        --inception-weights "$WORK/inception-random.pth" --batch-size 16 --is-split-size 16 --out "$2" --quiet
}
say "patchforcing eval against the ADM-style reference (stored statistics)"
run_eval "$WORK/ref-adm.npz" "$WORK/results-adm.json"
say "patchforcing eval against the plain image .npz (statistics from its images)"
run_eval "$WORK/ref-images.npz" "$WORK/results-images.json"

say "checking the JSON"
"$PY" - "$WORK" <<'EOF'
import json
import math
import sys
from pathlib import Path

work = Path(sys.argv[1])
a = json.loads((work / "results-adm.json").read_text())
b = json.loads((work / "results-images.json").read_text())
for r in (a, b):
    for name in ("FID", "sFID", "IS", "precision", "recall"):
        v = r["metrics"].get(name)
        assert isinstance(v, float) and math.isfinite(v), (name, v)
assert a["reference"]["statistics"] == {"pool": "stored in the reference file", "spatial": "stored in the reference file"}, a["reference"]
assert b["reference"]["statistics"]["pool"] == "computed from the reference images", b["reference"]
# same images, same network: stored and recomputed statistics give the same distances
for name in ("FID", "sFID"):
    assert math.isclose(a["metrics"][name], b["metrics"][name], rel_tol=1e-3, abs_tol=1e-6), (name, a["metrics"][name], b["metrics"][name])
print(json.dumps(a["metrics"], indent=2))
EOF
say "OK: the Inception evaluation stack works end to end (random weights: the values mean nothing)"
