"""Work beyond one host, on engines built for it (issue 21): `vilex tokenize-dataset` runs on Ray Data.

    inputs.py            INPUT (an image folder, parquet files, WebDataset shards) -> rows (source, key, image)
    output.py            the OUT folder: its settings, the shards a run commits, what a rerun skips, the reports
    tokenize_dataset.py  the job: the per-device tokenizer actor, progress, the Ray Data pipeline
    cli.py               `vilex tokenize-dataset`

Ray is imported inside functions only, so `vilex --help` and the core install work without the `scale` extra.
"""
