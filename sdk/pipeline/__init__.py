"""The adapt pipeline: prepare, train, decide (gate, selection), export, report."""
