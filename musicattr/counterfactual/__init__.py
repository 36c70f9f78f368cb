"""Counterfactual validation of attribution scores by retraining (``musicattr counterfactual``).

``subsets`` what each retrain leaves out and the plan, ``recipe`` theta0's fit recipe, ``retrain`` one resumable
retrain, ``queries`` the queries and their losses, ``methods`` the score tables of the methods, ``measure`` what
is measured on a retrained model, ``lds`` the LDS and its noise floor, ``leave_k_out`` top-K vs random-K,
``report`` the tables, ``campaign`` the stage. ``bank`` the shipped ground truth (``musicattr bank``: a benchmark
model, its queries, retrains reduced to their query losses), ``benchmark`` any method's scores against it
(``musicattr benchmark``), ``bank_stats`` its statistics (bootstrap, paired differences, null, noise ceiling).
"""
