"""The domain library of the Bitvavo trading stack. It never imports prefect."""
