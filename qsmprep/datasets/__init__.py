"""Files of simulated data: BIDS datasets written from ``qsmprep.simulate`` phantoms and
signals (tests, bundled examples, benchmarks) and readers of phantom sources (the QSM
challenge 2.0 segmentation). ``qsmprep.simulate`` itself stays array-in, array-out."""
