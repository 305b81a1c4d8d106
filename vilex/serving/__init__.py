"""Serving ViLex with NVIDIA Triton Inference Server.

    interface.py          the pipeline models' inputs and outputs, declared once
    config.py             config.pbtxt from the export contract (graph models) and interface.py (pipeline models)
    repository.py         `vilex triton-repo`: export folder -> model repository (with triton_repo/'s model.py files)
    pipeline_requests.py  checking a request's inputs (errors name the input)
    bls.py                inside the server: the BLS stage backend and the pipeline models' logic
    server.py             `vilex serve`: tritonserver from nvidia-pytriton, started and stopped cleanly
    client.py             tritonclient over HTTP or gRPC
    cli.py                the commands
"""
