"""The DeepPostures (CHAP) workload: the H5 format and its checks, a study generator, conversion to
a Petastorm windows dataset, the subject split, training sequences, the CNN-BiLSTM and its metrics,
the MOP workload, export and the CHAP prediction CSV."""
