"""Subprocess probe for tests/test_wkv_pallas.py: compiles, ahead of time for a TPU topology (libtpu, no
TPU needed), either the real training step of a config or one WKV forward+backward, in each requested
WKV form, and prints one JSON line per form: bytes and FLOPs per chip from cost_analysis(), and whether
the compiled program holds a Mosaic kernel call.

    JAX_PLATFORMS=cpu python tests/scripts/wkv_pallas_tpu_aot_probe.py step tiny parallel,pallas
    JAX_PLATFORMS=cpu python tests/scripts/wkv_pallas_tpu_aot_probe.py wkv tiny parallel,pallas
"""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(mode: str, config_name: str, forms: str, topology: str = "v5e:2x2"):
    spec = importlib.util.spec_from_file_location("tpu_aot_cost", ROOT / "benchmarks" / "tpu_aot_cost.py")
    aot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aot)
    config = aot.load_config(config_name)
    devices = aot.topology_devices(topology)
    batch, seq = config.train.batch_size, config.train.seq_len
    for form in forms.split(","):
        if mode == "step":
            compiled = aot.compile_train_step(config, devices, form, batch, seq)
        else:
            compiled = aot.compile_wkv(devices, form, batch, seq, config.model.d_att or config.model.d_model)
        text = compiled.as_text()
        print(json.dumps({"form": form, **aot.per_chip(compiled), "devices": len(devices),
                          "mosaic_calls": text.count("tpu_custom_call")}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
