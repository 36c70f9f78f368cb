"""Attribution reports people can listen to (``musicattr report``).

``inputs`` reads a query's scores and what they point to, ``baselines`` the similarity ranks,
``credits`` turns scores into credit shares, ``media`` writes audio and images, ``page`` the HTML,
``query`` one query's folder, ``compare_index`` a compare run's folders and index, ``stage`` the command.
"""
