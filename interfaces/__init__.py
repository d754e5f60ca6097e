"""Nipype interfaces of qsmprep: thin shells over the core functions in ``qsmprep.recon``."""
