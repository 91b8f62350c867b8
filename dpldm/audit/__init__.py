"""The empirical privacy audit (``dpldm audit``): canaries inserted into a DP fit (:mod:`.canaries`), the one-run
lower bound on epsilon from their scores (:mod:`.statistics`), and the driver that runs both (:mod:`.run`)."""
