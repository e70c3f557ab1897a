"""Benchmarks: molcloak against its peers (peers, ckks), encrypted timing (fhe_timing), the test split in FHE (testset_fhe), the CNN zoo (zoo_cnn)."""
