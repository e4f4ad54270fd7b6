"""Export to ONNX Runtime GenAI: OptimizeJob and AdapterBundle stages.

`stages.run_optimize` and `stages.run_bundle` are the entry points; they take local directories
(the caller resolves references and downloads) and write one output directory whose
`manifest.json` is written last. The heavy libraries (torch, onnx, onnxruntime-genai) are
imported by the modules that need them, not here.
"""
