"""ctxjax.base: a base model wanted by several processes at once is built once."""

import json
import os
import threading
import time

from ctxjax import base
from ctxjax.config import MODEL_SIZES, BaseModelConfig, ModelConfig


def test_a_base_wanted_twice_at_once_is_built_once(tmp_path, monkeypatch):
    """Two builders of the same base model at the same time (a reproduction's parallel workers):
    the second waits on the first's lock and reuses its folder instead of training into it too.
    Threads open the lock file separately, so flock excludes them as it does processes."""
    built = []

    def slow_build(task, model_cfg, base_cfg, out_dir, **_):
        built.append(out_dir)
        time.sleep(0.5)  # long enough for the other thread to arrive while this one builds
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, base.DONE_FILE), "w") as f:
            json.dump({}, f)
        return dict(seconds=0.5, final_sft_loss=0.0)

    monkeypatch.setattr(base, "train_base", slow_build)
    model_cfg = ModelConfig(vocab_size=320, **MODEL_SIZES["small"])
    base_cfg = BaseModelConfig(sft_steps=1, cache_dir=str(tmp_path))
    paths = []

    def want():
        paths.append(base.build_or_reuse_base("synthetic", {}, model_cfg, base_cfg, progress=False))

    threads = [threading.Thread(target=want) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(set(paths)) == 1 and paths[0] == built[0]
