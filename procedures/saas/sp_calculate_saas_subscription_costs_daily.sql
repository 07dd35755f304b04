-- sp_calculate_saas_subscription_costs_daily: amortize an org's SaaS subscription plans into exact daily costs.
--
-- CALL sp_calculate_saas_subscription_costs_daily(p_dataset, p_start_date, p_end_date, p_pipeline_id, p_run_id)
-- replaces the rows of `{p_dataset}.saas_subscription_plan_costs_daily` whose cost_date lies in
-- [p_start_date, p_end_date] (and no other row) with one row per subscription per day with non-zero cost,
-- in one MERGE (atomic without a transaction). Returns one row: dataset, start_date, end_date, rows_in_window.
--
-- Rules (plans come from `{p_dataset}.saas_subscription_plans`; enumerated values are compared exactly,
-- run the normalize_saas_plan_values migration first if they are not canonical):
-- * Status: `active`, `cancelled` and `expired` plans cost on their active days; `pending` (and any other
--   status) costs nothing. Active days are the days d with start_date <= d <= end_date (end_date NULL = open
--   ended); a plan with end_date < start_date costs nothing. Plans with an unknown billing_cycle or
--   pricing_model are skipped.
-- * Billing periods start on start_date and follow billing_cycle: weekly = 7 days from start_date;
--   monthly / quarterly / semi_annual / annual = 1 / 3 / 6 / 12 months. Month-based periods begin on the
--   anchor day (billing_anchor_day, default the day of start_date; values outside 1-31 are clamped to 1-31),
--   clamped to the last day of shorter months (anchor 31: Jan 31, Feb 28/29, Mar 31, ...). The first
--   period starts on the last anchor date on or before start_date: start_date itself when its day is the
--   (clamped) anchor day of its month, else the anchor date of the previous month, i.e. the anchor-aligned
--   period containing start_date, whose days before start_date are inactive. Later periods start on the
--   anchor date 1 / 3 / 6 / 12 months after the previous start. period_end = next period start - 1 day;
--   period_days = its length in days.
-- * list_charge = unit_price x seats for per_seat (seats NULL or < 1 means 1), unit_price for flat_fee.
--   The `seats` column holds the charged seats (NULL or < 1 -> 1) for both pricing models.
-- * period_charge = list_charge after the discount, never below 0 (a negative list_charge gives 0):
--   discount_type NULL (or unknown): none; `percent`: x (100 - v) / 100 with v = discount_value clamped to
--   [0, 100], rounded half away from zero to 9 decimals; `fixed`: - v with v floored at 0. A NULL
--   discount_value means 0.
-- * active_days = days of the period inside the plan's active days. billed_charge = period_charge x
--   active_days / period_days rounded half away from zero to 9 decimals (= period_charge for a full period).
-- * daily_cost = ROUND(period_charge / period_days, 9) on each active day of the period, except the LAST
--   active day, which gets billed_charge - (active_days - 1) x ROUND(period_charge / period_days, 9); so the
--   active days of every period sum EXACTLY to billed_charge. No row for inactive days or daily_cost = 0.
-- * The window only selects which days are written: periods and remainders are always computed on the
--   full period, so a window yields the same rows for its days as any larger run, and re-running a window
--   replaces the same rows (x_run_id, x_ingested_at are renewed).
-- * fiscal_year / fiscal_quarter come from org_profiles.fiscal_year_start_month of the org whose
--   org_dataset_id = p_dataset (default 1; values outside 1-12 count as 1). The fiscal year is named by the
--   calendar year in which it ends (start month 4: 2025-04-01..2026-03-31 is FY 2026); quarters 1-4 are
--   counted from the start month.
-- * currency from the plan; x_pipeline_id = p_pipeline_id, x_run_id = p_run_id,
--   x_ingested_at = CURRENT_TIMESTAMP().
-- * The window must be 1-366 days (p_start_date <= p_end_date, neither NULL); p_dataset must be a plain
--   dataset name; p_pipeline_id and p_run_id must not be NULL. Otherwise the call fails (ERROR) and writes
--   nothing.
-- * subscription_id must be unique in the plans table (MERGE rejects two source rows for one target row).
--
-- Exact arithmetic: money is computed in INT64 nano-units (value x 10^9) with DIV / MOD and explicit
-- half-away-from-zero rounding (the percent product is split into 10^9 limbs so that nothing overflows), and
-- converted back by multiplying by NUMERIC '0.000000001'. No NUMERIC division is used (the emulator divides
-- in FLOAT64, so ties and large values would round differently from BigQuery). Limit: unit_price x seats
-- below 9.2e9 (INT64 nano-units); a larger charge fails the call with an overflow error.
--
-- Runs unchanged on BigQuery and on the bqemulator emulator, whose procedure bodies need:
-- * no IF / WHILE statements, transactions or CASE expressions outside string literals (the body is cut at
--   the first END): the argument checks are SELECT IF(cond, ERROR(msg), 0) (IF evaluates ERROR only when
--   cond is true), the work is one EXECUTE IMMEDIATE with `?` parameters (named ones fail);
-- * NUMERIC '...' literals (never CAST(x AS NUMERIC)), and no DATE_ADD / DATE_SUB in the statement: they
--   make the emulator re-serialize it, which turns NUMERIC literals into 3-decimal DECIMALs; dates move with
--   DATE(d + INTERVAL n DAY) instead;
-- * every DIV / MOD call and compound argument in parentheses: the emulator rewrites DIV(a - b, c) to
--   a - b // c and 2 * MOD(a, b) to 2 * a % b;
-- * no quotes in comments inside the SQL string (taken for string delimiters) and no window filter in the
--   MERGE ON clause (the emulator then falls back to a nested-loop join: minutes instead of seconds).
CREATE OR REPLACE PROCEDURE `${project}.${dataset}.sp_calculate_saas_subscription_costs_daily`(
  p_dataset STRING, p_start_date DATE, p_end_date DATE, p_pipeline_id STRING, p_run_id STRING)
BEGIN
  DECLARE fy_start_month INT64 DEFAULT 1;
  DECLARE rows_in_window INT64 DEFAULT 0;

  SELECT IF(p_dataset IS NULL OR p_dataset = '' OR REGEXP_CONTAINS(p_dataset, r'[^A-Za-z0-9_]'),
            ERROR('p_dataset must be a dataset name (letters, digits, underscores)'), 0) AS dataset_check;
  SELECT IF(p_start_date IS NULL OR p_end_date IS NULL OR p_end_date < p_start_date,
            ERROR('p_start_date and p_end_date are required and p_start_date must not be after p_end_date'),
            0) AS window_check;
  SELECT IF(DATE_DIFF(p_end_date, p_start_date, DAY) + 1 > 366,
            ERROR(CONCAT('window of ', CAST(DATE_DIFF(p_end_date, p_start_date, DAY) + 1 AS STRING),
                         ' days exceeds the limit of 366 days')), 0) AS window_length_check;
  SELECT IF(p_pipeline_id IS NULL OR p_run_id IS NULL,
            ERROR('p_pipeline_id and p_run_id are required'), 0) AS lineage_check;

  SET fy_start_month = IFNULL((
    SELECT MAX(fiscal_year_start_month) FROM `${project}.${dataset}.org_profiles`
    WHERE org_dataset_id = p_dataset AND fiscal_year_start_month BETWEEN 1 AND 12), 1);

  EXECUTE IMMEDIATE FORMAT("""
    MERGE `${project}.%s.saas_subscription_plan_costs_daily` AS t
    USING (
      WITH params AS (
        SELECT CAST(? AS DATE) AS w_start, CAST(? AS DATE) AS w_end, CAST(? AS INT64) AS fy_start,
               CAST(? AS STRING) AS pipeline_id, CAST(? AS STRING) AS run_id
      ),
      plans AS (
        SELECT
          p.subscription_id, p.provider, p.plan_name, p.category, p.currency, p.billing_cycle,
          p.pricing_model, p.contract_id, p.start_date, p.end_date, p.discount_type,
          GREATEST(IFNULL(p.seats, 1), 1) AS seats,
          CASE p.billing_cycle WHEN 'weekly' THEN 0 WHEN 'monthly' THEN 1 WHEN 'quarterly' THEN 3
                               WHEN 'semi_annual' THEN 6 WHEN 'annual' THEN 12 END AS cycle_months,
          LEAST(GREATEST(IFNULL(p.billing_anchor_day, EXTRACT(DAY FROM p.start_date)), 1), 31) AS anchor_day,
          CAST(p.unit_price * 1000000000 AS INT64)
            * (CASE WHEN p.pricing_model = 'per_seat' THEN GREATEST(IFNULL(p.seats, 1), 1) ELSE 1 END) AS list_n,
          -- discount values in nano-units: percent clamped to [0, 100], fixed to [0, 9e9]; 0 for other types
          CASE WHEN p.discount_type = 'percent' THEN
            CAST(LEAST(GREATEST(IFNULL(p.discount_value, NUMERIC '0'), NUMERIC '0'), NUMERIC '100')
                 * 1000000000 AS INT64) ELSE 0 END AS percent_off_n,
          CASE WHEN p.discount_type = 'fixed' THEN
            CAST(LEAST(GREATEST(IFNULL(p.discount_value, NUMERIC '0'), NUMERIC '0'), NUMERIC '9000000000')
                 * 1000000000 AS INT64) ELSE 0 END AS fixed_off_n,
          GREATEST(p.start_date, params.w_start) AS lo,
          LEAST(IFNULL(p.end_date, params.w_end), params.w_end) AS hi
        FROM `${project}.%s.saas_subscription_plans` AS p CROSS JOIN params
        WHERE p.status IN ('active', 'cancelled', 'expired')
          AND p.billing_cycle IN ('weekly', 'monthly', 'quarterly', 'semi_annual', 'annual')
          AND p.pricing_model IN ('per_seat', 'flat_fee')
          AND p.start_date <= params.w_end
          AND (p.end_date IS NULL OR p.end_date >= GREATEST(p.start_date, params.w_start))
      ),
      charged AS (
        -- period_charge in nano-units. Percent: round(L x P x 10^-11) with L = list_n, P = (100 - v) x 10^9,
        -- computed on 10^9 limbs (L = lh x 10^9 + ll, P = ph x 10^9 + pl) so that no product overflows INT64:
        -- L x P x 10^-11 = lh x ph x 10^7 + m x 10^-2 + ll x pl x 10^-11 with m = lh x pl + ll x ph.
        -- Every DIV and MOD call and every compound argument is parenthesized: the emulator drops the
        -- parentheses of DIV(a - b, c) and MOD(a, b) when it translates them to operators.
        SELECT *,
          CASE
            WHEN discount_type = 'percent' THEN
              lh * ph * 10000000 + (DIV(m, 100)) + (DIV(f, 100000000000))
              + (CASE WHEN 2 * (MOD(f, 100000000000)) >= 100000000000 THEN 1 ELSE 0 END)
            WHEN discount_type = 'fixed' THEN GREATEST(l_n - fixed_off_n, 0)
            ELSE l_n
          END AS charge_n
        FROM (
          SELECT *, (MOD(m, 100)) * 1000000000 + ll * pl AS f
          FROM (
            SELECT *, lh * pl + ll * ph AS m
            FROM (
              SELECT *,
                (DIV(l_n, 1000000000)) AS lh, (MOD(l_n, 1000000000)) AS ll,
                (DIV((100000000000 - percent_off_n), 1000000000)) AS ph,
                (MOD((100000000000 - percent_off_n), 1000000000)) AS pl
              FROM (SELECT *, GREATEST(list_n, 0) AS l_n FROM plans)
            )
          )
        )
      ),
      indexed AS (
        -- i0 = month index (year x 12 + month - 1) of the first period start: the month of start_date, or the
        -- month before when the anchor day of that month (clamped to its length) falls after the day of
        -- start_date (no quotes in these comments: the emulator would take them for string delimiters)
        SELECT *,
          EXTRACT(YEAR FROM start_date) * 12 + EXTRACT(MONTH FROM start_date) - 1
            - (CASE WHEN LEAST(anchor_day, EXTRACT(DAY FROM LAST_DAY(start_date))) > EXTRACT(DAY FROM start_date)
                    THEN 1 ELSE 0 END) AS i0,
          EXTRACT(YEAR FROM lo) * 12 + EXTRACT(MONTH FROM lo) - 1 AS lo_idx,
          EXTRACT(YEAR FROM hi) * 12 + EXTRACT(MONTH FROM hi) - 1 AS hi_idx
        FROM charged
      ),
      numbered AS (
        -- period numbers k (0 = first period) that may overlap [lo, hi]; a little wider, filtered below
        SELECT *, i0 + k * cycle_months AS s_idx, i0 + (k + 1) * cycle_months AS e_idx
        FROM indexed,
          UNNEST(GENERATE_ARRAY(
            CASE WHEN cycle_months = 0 THEN (DIV((DATE_DIFF(lo, start_date, DAY)), 7))
                 ELSE GREATEST((DIV((lo_idx - i0), cycle_months)) - 1, 0) END,
            CASE WHEN cycle_months = 0 THEN (DIV((DATE_DIFF(hi, start_date, DAY)), 7))
                 ELSE (DIV((hi_idx - i0), cycle_months)) END)) AS k
      ),
      periods AS (
        -- DATE(d + INTERVAL n DAY), not DATE_ADD or DATE_SUB: those make the emulator re-serialize the whole
        -- statement, which turns NUMERIC literals into 3-decimal DECIMALs
        SELECT * FROM (
          SELECT *,
            CASE WHEN cycle_months = 0 THEN DATE(start_date + INTERVAL (7 * k) DAY)
                 ELSE DATE((DIV(s_idx, 12)), (MOD(s_idx, 12)) + 1,
                           LEAST(anchor_day, EXTRACT(DAY FROM LAST_DAY(DATE((DIV(s_idx, 12)), (MOD(s_idx, 12)) + 1, 1)))))
            END AS period_start,
            CASE WHEN cycle_months = 0 THEN DATE(start_date + INTERVAL (7 * k + 6) DAY)
                 ELSE DATE(DATE((DIV(e_idx, 12)), (MOD(e_idx, 12)) + 1,
                                LEAST(anchor_day, EXTRACT(DAY FROM LAST_DAY(DATE((DIV(e_idx, 12)), (MOD(e_idx, 12)) + 1, 1)))))
                           - INTERVAL 1 DAY)
            END AS period_end
          FROM numbered
        )
        WHERE period_start <= hi AND period_end >= lo
      ),
      billed AS (
        -- base_n = round(charge_n x 1 over period_days); billed_n = round(charge_n x active_days over
        -- period_days) = q x active_days + round(r x active_days over period_days), with q and r the
        -- quotient and remainder of charge_n by period_days (no overflow for any charge below 9.2e9)
        SELECT *,
          q + (CASE WHEN 2 * r >= period_days THEN 1 ELSE 0 END) AS base_n,
          q * active_days + (DIV(ra, period_days))
            + (CASE WHEN 2 * (MOD(ra, period_days)) >= period_days THEN 1 ELSE 0 END) AS billed_n
        FROM (
          SELECT *, r * active_days AS ra
          FROM (
            SELECT *, (DIV(charge_n, period_days)) AS q, (MOD(charge_n, period_days)) AS r,
              DATE_DIFF(active_end, active_start, DAY) + 1 AS active_days
            FROM (
              SELECT *, DATE_DIFF(period_end, period_start, DAY) + 1 AS period_days,
                GREATEST(start_date, period_start) AS active_start,
                LEAST(IFNULL(end_date, period_end), period_end) AS active_end
              FROM periods
            )
          )
        )
      ),
      days AS (
        SELECT b.*, cost_date,
          CASE WHEN cost_date = active_end THEN billed_n - (active_days - 1) * base_n ELSE base_n END AS daily_n
        FROM billed AS b CROSS JOIN params,
          UNNEST(GENERATE_DATE_ARRAY(GREATEST(b.active_start, params.w_start), LEAST(b.active_end, params.w_end))) AS cost_date
      )
      SELECT
        d.subscription_id, d.provider, d.plan_name, d.category, d.cost_date,
        d.daily_n * NUMERIC '0.000000001' AS daily_cost,
        d.currency, d.billing_cycle, d.pricing_model, d.seats, d.period_start, d.period_end,
        d.period_days, d.active_days,
        d.list_n * NUMERIC '0.000000001' AS list_charge,
        d.charge_n * NUMERIC '0.000000001' AS period_charge,
        d.billed_n * NUMERIC '0.000000001' AS billed_charge,
        EXTRACT(YEAR FROM d.cost_date)
          + (CASE WHEN params.fy_start > 1 AND EXTRACT(MONTH FROM d.cost_date) >= params.fy_start THEN 1 ELSE 0 END)
          AS fiscal_year,
        (DIV((MOD((EXTRACT(MONTH FROM d.cost_date) - params.fy_start + 12), 12)), 3)) + 1 AS fiscal_quarter,
        d.contract_id,
        params.pipeline_id AS x_pipeline_id, params.run_id AS x_run_id, CURRENT_TIMESTAMP() AS x_ingested_at
      FROM days AS d CROSS JOIN params
      WHERE d.daily_n != 0
    ) AS s
    ON t.subscription_id = s.subscription_id AND t.cost_date = s.cost_date
    WHEN MATCHED THEN UPDATE SET
      provider = s.provider, plan_name = s.plan_name, category = s.category, daily_cost = s.daily_cost,
      currency = s.currency, billing_cycle = s.billing_cycle, pricing_model = s.pricing_model, seats = s.seats,
      period_start = s.period_start, period_end = s.period_end, period_days = s.period_days,
      active_days = s.active_days, list_charge = s.list_charge, period_charge = s.period_charge,
      billed_charge = s.billed_charge, fiscal_year = s.fiscal_year, fiscal_quarter = s.fiscal_quarter,
      contract_id = s.contract_id, x_pipeline_id = s.x_pipeline_id, x_run_id = s.x_run_id,
      x_ingested_at = s.x_ingested_at
    WHEN NOT MATCHED BY TARGET THEN INSERT (
      subscription_id, provider, plan_name, category, cost_date, daily_cost, currency, billing_cycle,
      pricing_model, seats, period_start, period_end, period_days, active_days, list_charge, period_charge,
      billed_charge, fiscal_year, fiscal_quarter, contract_id, x_pipeline_id, x_run_id, x_ingested_at)
    VALUES (
      s.subscription_id, s.provider, s.plan_name, s.category, s.cost_date, s.daily_cost, s.currency,
      s.billing_cycle, s.pricing_model, s.seats, s.period_start, s.period_end, s.period_days, s.active_days,
      s.list_charge, s.period_charge, s.billed_charge, s.fiscal_year, s.fiscal_quarter, s.contract_id,
      s.x_pipeline_id, s.x_run_id, s.x_ingested_at)
    WHEN NOT MATCHED BY SOURCE AND t.cost_date BETWEEN ? AND ? THEN DELETE
  """, p_dataset, p_dataset)
  USING p_start_date, p_end_date, fy_start_month, p_pipeline_id, p_run_id, p_start_date, p_end_date;

  EXECUTE IMMEDIATE FORMAT("""
    SELECT COUNT(*) FROM `${project}.%s.saas_subscription_plan_costs_daily` WHERE cost_date BETWEEN ? AND ?
  """, p_dataset) INTO rows_in_window USING p_start_date, p_end_date;

  SELECT p_dataset AS dataset, p_start_date AS start_date, p_end_date AS end_date, rows_in_window;
END
