"""torch-only math shared by training and every exported model; the export copies these files unchanged, so they
import only torch, transformers (the two HF wrapper files) and each other, relatively.

- transformer.py, bert_blocks.py: the two backbone families (tokens (+ t) -> logits), config read by attribute;
- schedule.py: noise schedules alpha(t);
- sampling.py, sampling_steps.py: the samplers (block loop; denoiser, token choice, ancestral and remask steps);
- uniform_state.py, uniform_sampling.py: uniform-state (UDLM, Duo) math and its sampler (process="uniform");
- configuration_unmask.py, modeling_unmask.py: the Hugging Face wrappers around the above.

Relative imports between siblings are what make the files work both as `unmask.core.*` and in the flat exported
folder (transformers' dynamic-module loader copies the siblings a relative import names). This __init__ is not
exported.
"""
