"""The floor under the stages: what every stage uses and no stage owns.

Configs' base, name registries and the compression-method registry (`MethodConfig`, `CalibLoop`), grid maths
(`qparams`), range observers and calibrators, quantizer modules and how they attach, typed per-layer specs, layer
selection, sparsity masks, BatchNorm re-estimation, the int32 bias bound and Q/DQ placement. Nothing here imports a
stage (compress, finetune, analyze, export, bench, study) or models/data; the built-in methods are loaded by name on
the first registry lookup. Model-level algorithms (SparseGPT, GPTQ, PTQ4ViT's search, low rank) are methods and live
in `compress/`.
"""
