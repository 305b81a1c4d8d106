"""What a runtime needs from an export folder (`engines/NAME`), with no build tooling:

    contract.py   one declaration per graph: names, dtypes, dynamic axes, bounds, opset, tolerances
    folder.py     EngineFolder: manifest.json, file sizes and hashes, the source checkpoint's hash
    host.py       the host-side files and `pipeline_from_engines` (the pipeline without PyTorch weights)
    precision.py  the precision policy: what an fp16 export keeps in fp32, what an int8/fp8 export quantizes
                  in the UNet and what it keeps float, and why

`vilex.export` (build time) writes these folders and imports this package; nothing here imports it.
"""
