"""Training MobileNetV1/V2: `python -m train.main`, `python -m train.eval`, `python -m train.compare`,
`python -m train.predict`.

    data.py         input pipelines (digits, TFDS, an image folder, through grain)
    augment.py      the transforms (torchvision's recipe for an image folder)
    folder.py       an image folder in torchvision's ImageFolder layout: layout checks, decoding
    config.py       flags and the papers' recipes as presets
    optim.py        schedules and optax chains with torch.optim's semantics
    step.py         create_train_state, train_step, eval_step (JAX)
    torch_step.py   the same for torch_ref, and its checkpoint file
    distributed.py  mesh, shardings, multi-host set-up
    checkpoint.py   orbax checkpoints, and where the PyTorch path's goes
    metrics.py      metrics.jsonl and the curves PNG
    main.py         the training loop
    lock.py         one run per workdir
    predict.py      the top classes of image files, in either framework
"""
