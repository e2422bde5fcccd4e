"""What both export and bench use to run and read artifacts, so that neither imports the other.

The tolerance policy (`tolerance`), ONNX Runtime CPU sessions (`onnx_session`), ONNX graph reading (`onnx_graph`), the
metadata every artifact carries (`metadata`), the TensorRT engine runner (`tensorrt_runner`) and the AOTInductor
loader (`aoti`). Runtimes are imported on use: `import craft_deploy` needs none of them.
"""
