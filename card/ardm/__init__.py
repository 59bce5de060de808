"""ARDM (Hoogeboom et al. 2022) with a CARD model: budgeted plans by dynamic programming (``plan``) and lossless
compression with an entropy coder (``compress``, file format in ``container``)."""
