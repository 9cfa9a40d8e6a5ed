"""Export of a saved SnapGen pipeline to deployable artefacts (ONNX, Core ML) with a parity gate."""
