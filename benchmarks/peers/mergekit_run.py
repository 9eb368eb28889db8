#!/usr/bin/env python
"""Run mergekit-yaml (in its own virtualenv) with one workaround, for benchmarks/merge_vs_mergekit.py.

    /work/venv-mergekit/bin/python benchmarks/peers/mergekit_run.py CONFIG.yaml OUT [mergekit-yaml options]

mergekit 0.1.5 crashes on every BERT merge: MergePlanner.plan_tensor builds `[w_in.name] + (w_in.aliases or [])`
for optional weights (BERT's embeddings.position_ids), and aliases is a tuple there ("can only concatenate list (not
"tuple") to list"). The wrapper below hands plan_tensor a name-only copy of such optional weights' inputs when the
folders do not hold any alias, which is the case here; nothing else in mergekit is changed.
"""

import sys

from mergekit import plan
from mergekit.scripts.run_yaml import main

_original = plan.MergePlanner.plan_tensor


def _plan_tensor(self, weight, weights_in, models, cfg_reader):
    if weight.optional:
        weights_in = [w.model_copy(update={"aliases": None}) if w.aliases else w for w in weights_in]
    return _original(self, weight, weights_in, models, cfg_reader)


plan.MergePlanner.plan_tensor = _plan_tensor

if __name__ == "__main__":
    sys.exit(main())
