"""Scale-out on Ray (the optional extra ``lmforge[ray]``): serving replicas on Ray Serve, batch
files and the preference pipeline's stages on Ray Data, DPO reference log-probs on Ray actors.

Nothing outside this package imports Ray; without the extra every module here fails with one
message naming it (``ray_env.import_ray``), and the rest of lmforge is unchanged.
"""
