"""Target data: dataset readers, robust image decoding, synthetic FER domains."""
