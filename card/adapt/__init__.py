"""Stage 2: continue training a CARD checkpoint under the CARD objective."""
