"""Distillation of converted RetNets (and from-scratch training); see distill/README.md.

Modules: config (YAML schema, overrides), data (packed, resumable token stream), losses
(KL + CE, attention transfer), attention_transfer (stage 1's layer-local training), models
(teacher/student/scratch, LoRA), engine (plain PyTorch or DeepSpeed), checkpoint (atomic
checkpoints, export), logit_cache (top-k teacher cache), metrics (JSON lines, TensorBoard, tqdm),
trainer (the stages), sweep (grid runner), report (markdown tables from metrics.jsonl).
`distill/train.py` is the launcher script.
"""
