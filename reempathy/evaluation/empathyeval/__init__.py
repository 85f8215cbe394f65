"""EmpathyEval: an audio-in LM (Qwen2.5-Omni / Qwen3-Omni-MoE thinker) + LoRA + four regression heads.

- ``options``: the evaluator's options
- ``omni``: loading a thinker from a local directory through transformers' native classes
- ``prompt``: dialogue → chat tokens with audio placeholders + audio features (shared by training and scoring)
- ``audio``: turns as waveforms (WAV files, or units through a speech decoder), resampled
- ``model``: the score heads and the wrapper that computes LM + score losses
- ``checkpoint``: adapter + heads (safetensors) + ``evaluator.json``
- ``train``: ``reempathy train`` with an ``[evaluator]`` config; validation LCC/SRCC/MSE
- ``evaluator``: the ``empathyeval`` evaluator
- ``tiny``: tiny random directories in the published formats (tests)
"""
