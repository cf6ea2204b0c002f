"""Studies of the samplers, apart from the decode path (sampling/, inference.py never import this package).

- ``fidelity``: teacher-forced acceptance against draft-feature fidelity (launcher/acceptance_study.py).
- ``entropy_study``: draft entropy vs acceptance, Fig. 6 and the early-stop threshold tau (launcher/entropy_study.py).
- ``two_sample``: permutation two-sample tests that a fast sampler emits the reference distribution (the tests).
"""
