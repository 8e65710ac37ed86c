"""Evaluation of CLIP models: zero-shot classification, image–text retrieval and linear probes.

    zeroshot.py      prompt-ensembled zero-shot classifier (`build_classifier`), top-1/top-5/per-class metrics
    retrieval.py     Recall@K image→text and text→image with several captions per image
    linear_probe.py  L2-regularised logistic regression on frozen features, λ chosen on a validation split
    templates.py     prompt templates and class names as data (OpenAI's ImageNet/CIFAR lists, scenes)
    features.py      jitted, batched image/text encoders and tokenizers for a model configuration
    datasets.py      eval data specs (scenes, ingested dirs, ImageFolders, TFDS) as masked batches
    registry.py      `EVALUATORS` and `make_evaluators(config.evals, model_cfg)` for evals during training

Command line: ``python -m clipjax.evaluate --model PATH --task zeroshot --data SPEC`` (see ``__main__``).
"""
