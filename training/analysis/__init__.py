"""The paper's analyses as tools (`python -m training.analysis ...`, docs/analysis.md):
frequency.py — D_FFT, radial averages, sampler-trajectory and block-wise spectra (paper §4.5, Fig. 4; Appendix E,
Fig. 6); teacher_student.py — FID between K-step teachers and a one-step student (paper §2.3, Fig. 2);
plots.py — their figures, drawn from the same dicts that are written as JSON."""
