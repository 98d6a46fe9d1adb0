"""Other libraries' formats: transformers checkpoints (:mod:`moe_lab.interop.hf`) and the
lm-evaluation-harness (:mod:`moe_lab.interop.harness`)."""
