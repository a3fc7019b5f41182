"""`make bench`: served and raw decode speed, client scaling, the bandwidth roofline (cli.py)."""
