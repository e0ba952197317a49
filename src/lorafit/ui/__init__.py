"""`lorafit ui`: the runs, sweeps and "will it fit?" in the browser, live while runs train.

`catalog` finds the runs (the run store's and the run directories under the run roots) as typed
entries; `views` builds what each page shows with the reports' own code; `fit` puts the estimator
behind a form; `app` is the FastAPI app (the key, the Host guard, the Content-Security-Policy, the live
stream) and serves the page in `static/`.
"""
