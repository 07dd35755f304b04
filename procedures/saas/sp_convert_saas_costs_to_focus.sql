-- Convert an org's amortized SaaS subscription costs (saas_subscription_plan_costs_daily) into the FOCUS 1.2
-- cost table (cost_data_focus_1_2) for the window [p_start_date, p_end_date].
--
-- Replaces, in one MERGE, only the rows with x_SourceSystem = 'saas_subscription' and x_ChargeDate in the
-- window; rows of other sources and of other days are never touched, and re-running a window gives the
-- same rows. Reads the window's daily rows and the plans table (start date and tags only).
--
-- Arguments: p_dataset (org dataset, e.g. acme_local), p_start_date, p_end_date (inclusive UTC days),
-- p_pipeline_id, p_run_id (lineage). Returns one row: dataset, window, purchase_rows, usage_rows,
-- billed_cost, effective_cost (exact decimal strings; the emulator prints NUMERIC results with 3 decimals).
--
-- Model (prepaid recurring purchase, amortized):
--   * Purchase row, one per billing period whose billing day falls in the window. The billing day is the
--     period's first active day: period_start, or the plan's start_date when the service starts later
--     (period_start when the plan is no longer in saas_subscription_plans).
--     It carries what is invoiced (BilledCost = billed_charge) and EffectiveCost = 0 (it covers future
--     days). ChargePeriod = the period's active days [first active day, first active day + active_days).
--   * Usage row, one per daily row: BilledCost = 0, EffectiveCost = daily_cost, ChargePeriod = [day, day+1).
--   So SUM(BilledCost) over any rows = invoiced charges and SUM(EffectiveCost) = amortized cost, never
--   both for the same money. The Purchase row's List/ContractedCost equal the sum of its Usage rows'
--   List/ContractedCost over the whole period, so those two columns are additive within one
--   ChargeCategory only: filter ChargeCategory = 'Usage' (amortized) or 'Purchase' (as bought).
--
-- Amounts: every *UnitPrice x PricingQuantity equals its *Cost exactly (FOCUS requires it), so the money
-- is split per unit of PricingQuantity (q) first and multiplied by q after. Per unit, rounded to 1e-9:
--   list, period    = list_charge / q x active_days / period_days
--   list, day       = list_charge / q / period_days
--   contracted, period = billed_charge / q (exact unless that has more than 9 decimals)
--   contracted, day = period_charge / q / period_days
--   The Purchase row carries the period amounts. A Usage row carries the day amount, except on the last
--   active day of the period, which takes the period amount minus the other active days: the daily
--   table splits daily_cost the same way, so the Usage rows of a period sum exactly to its Purchase row,
--   ListCost over a period = list_charge x active_days / period_days (never the full charge repeated on
--   each day), and with q = 1 ContractedCost = EffectiveCost = daily_cost on every Usage row (with q > 1
--   they differ by the per-unit rounding, a few 1e-9 per row).
--   The arithmetic runs on INT64 nano-units (quotient and remainder kept apart, so nothing overflows for
--   charges below 9.2e9 per period): the emulator evaluates NUMERIC division in FLOAT64.
--   Reconciliation: SUM(BilledCost) = invoiced charges, SUM(EffectiveCost) = amortized cost; sum
--   ListCost and ContractedCost within one ChargeCategory only.
--
-- Column mapping (P = Purchase row, U = Usage row; d = daily row; q = PricingQuantity):
--   BilledCost                     P: billed_charge                         U: 0
--   EffectiveCost                  P: 0                                     U: daily_cost
--   ListUnitPrice                  P: list_charge / q x active/period days  U: list_charge / q / period_days
--                                                                           (last active day: the remainder)
--   ListCost                       ListUnitPrice x q
--   ContractedUnitPrice            P: billed_charge / q                     U: period_charge / q / period_days
--                                                                           (last active day: the remainder)
--   ContractedCost                 ContractedUnitPrice x q
--   PricingQuantity                q = seats (per_seat, at least 1), 1 (flat_fee)
--   PricingUnit                    'Seat' (per_seat), 'Subscription' (flat_fee)
--   ConsumedQuantity / ConsumedUnit  P: NULL / NULL                        U: q / PricingUnit
--   ChargeCategory                 P: 'Purchase'                            U: 'Usage'
--   ChargeFrequency                'Recurring' (both; FOCUS forbids only Usage-Based for Purchase)
--   ChargeClass                    NULL (no corrections)
--   ChargeDescription              P: '<Provider> <plan> <cycle> subscription, <q> seat(s)|flat fee, service <first> to <last>'
--                                  U: '<Provider> <plan> <cycle> subscription, <q> seat(s)|flat fee, amortized share for <day>'
--   ChargePeriodStart / End        P: first active day / + active_days      U: cost_date / + 1 day (00:00 UTC)
--   BillingPeriodStart / End       calendar month (UTC) of x_ChargeDate: first day / first day of next month
--   BillingCurrency                currency
--   PricingCategory                'Standard'
--   PricingCurrency                currency
--   PricingCurrencyListUnitPrice / PricingCurrencyContractedUnitPrice / PricingCurrencyEffectiveCost
--                                  = ListUnitPrice / ContractedUnitPrice / EffectiveCost (same currency)
--   ProviderName, PublisherName, InvoiceIssuerName
--                                  provider display name: a known spelling (OpenAI, GitHub, ...), the
--                                  provider as given when it has capitals, else INITCAP with '_'/'-' as spaces
--   ServiceName                    '<Provider> <plan_name>' (plan names repeat across providers, e.g. Zoom
--                                  Pro and Datadog Pro, and FOCUS wants one ServiceCategory per ServiceName)
--   ServiceCategory                category when it is a FOCUS 1.2 value (case-insensitive), else 'Other'
--   ServiceSubcategory             'Other (<ServiceCategory>)'
--   BillingAccountId               contract_id, else subscription_id
--   BillingAccountName             '<Provider> <BillingAccountId>'
--   BillingAccountType             'Contract' (contract_id set), else 'Subscription'
--   SubAccountId / Name / Type     subscription_id / '<Provider> <plan_name>' / 'Subscription'
--   SkuId                          '<provider>/<plan_name>/<pricing_model>' (provider lowercased)
--   SkuPriceId                     '<SkuId>/<billing_cycle>/<currency>'
--   SkuMeter                       'Seats' (per_seat), 'Subscription' (flat_fee)
--   SkuPriceDetails                {"x_BillingCycle": billing_cycle, "x_PricingModel": pricing_model}
--   Tags                           the plan's tags as a JSON object ({} when none or the plan is gone); a
--                                  JSON string holding an object (what loading json.dumps(tags) stores) is parsed
--   InvoiceId                      NULL (the provider's invoice id is not known)
--   CommitmentDiscount* (7), CapacityReservationId/Status, ResourceId/Name/Type, RegionId/Name,
--   AvailabilityZone               NULL (no commitment discounts, reservations, resources or regions)
--   x_SourceSystem                 'saas_subscription'
--   x_ChargeDate                   P: billing day (first active day)        U: cost_date
--   x_SubscriptionId               subscription_id
--   x_ServicePeriodStart / End     period_start / period_end (the billing period of the plan, inclusive)
--   x_BillingCycle, x_PricingModel billing_cycle, pricing_model
--   x_PipelineId, x_RunId          p_pipeline_id, p_run_id
--   x_IngestedAt                   CURRENT_TIMESTAMP() (UTC)
--
-- Written for BigQuery and the bqemulator 1.4.0, whose traps shape the SQL:
--   * no IF/WHILE/transactions in the body: the argument checks are ERROR() inside SET;
--   * no named USING parameters: positional `?`; the dataset goes in with FORMAT %s (checked first);
--   * NUMERIC casts are NUMERIC(38, 9) (plain NUMERIC keeps 3 decimals), and the dynamic SQL contains no
--     DATE_ADD/DATE_SUB (TIMESTAMP_ADD and DATE(TIMESTAMP) instead), TO_JSON, STRUCT, SAFE. or the
--     division operator: each makes the emulator re-serialize the statement, which turns NUMERIC(38, 9)
--     into a 3-decimal DECIMAL; every value is computed in the MERGE source, none in VALUES;
--   * DIV and MOD calls and DIV arguments are parenthesized (the emulator drops their grouping);
--   * comments inside the dynamic SQL hold no quotes and no percent signs (FORMAT and the emulator
--     would read them).
CREATE OR REPLACE PROCEDURE `${project}.${dataset}.sp_convert_saas_costs_to_focus`(
  p_dataset STRING, p_start_date DATE, p_end_date DATE, p_pipeline_id STRING, p_run_id STRING)
BEGIN
  DECLARE checked INT64;
  SET checked = (SELECT IF(
    p_dataset IS NULL OR p_dataset = '' OR REGEXP_CONTAINS(p_dataset, r'[^A-Za-z0-9_]'),
    ERROR('sp_convert_saas_costs_to_focus: p_dataset must be a dataset name'),
    IF(p_start_date IS NULL OR p_end_date IS NULL OR p_start_date > p_end_date,
       ERROR('sp_convert_saas_costs_to_focus: p_start_date and p_end_date are required, start <= end'),
       IF(p_pipeline_id IS NULL OR p_run_id IS NULL,
          ERROR('sp_convert_saas_costs_to_focus: p_pipeline_id and p_run_id are required'), 1))));

  EXECUTE IMMEDIATE FORMAT("""
    MERGE `${project}.%s.cost_data_focus_1_2` AS T
    USING (
      WITH params AS (
        SELECT ? AS start_date, ? AS end_date, ? AS pipeline_id, ? AS run_id
      ),
      plans AS (
        SELECT ranked.subscription_id, ranked.start_date, ranked.tags
        FROM (
          SELECT subscription_id, start_date, tags,
                 ROW_NUMBER() OVER (PARTITION BY subscription_id ORDER BY x_loaded_at DESC) AS plan_row
          FROM `${project}.%s.saas_subscription_plans`
        ) AS ranked
        WHERE ranked.plan_row = 1
      ),
      base AS (
        SELECT
          d.subscription_id, d.provider, d.plan_name, d.category, d.cost_date, d.daily_cost, d.currency,
          d.billing_cycle, d.pricing_model, d.period_start, d.period_end, d.billed_charge,
          NULLIF(TRIM(d.contract_id), '') AS contract_id,
          GREATEST(d.period_days, 1) AS period_days,
          LEAST(GREATEST(d.active_days, 1), GREATEST(d.period_days, 1)) AS active_days,
          IF(d.pricing_model = 'per_seat', GREATEST(IFNULL(d.seats, 1), 1), 1) AS qty,
          CAST(d.list_charge * 1000000000 AS INT64) AS list_nanos,
          CAST(d.period_charge * 1000000000 AS INT64) AS charge_nanos,
          CAST(d.billed_charge * 1000000000 AS INT64) AS billed_nanos,
          p.start_date AS plan_start,
          -- a JSON object, or a JSON string holding one (how a load job stores a serialized object)
          COALESCE(PARSE_JSON(JSON_VALUE(p.tags)), p.tags, PARSE_JSON('{}')) AS tags,
          pr.pipeline_id, pr.run_id, pr.start_date AS window_start, pr.end_date AS window_end
        FROM `${project}.%s.saas_subscription_plan_costs_daily` AS d
        CROSS JOIN params AS pr
        LEFT JOIN plans AS p ON p.subscription_id = d.subscription_id
        WHERE d.cost_date BETWEEN pr.start_date AND pr.end_date
      ),
      described AS (
        SELECT
          b.*,
          -- first active day of the period = billing day, clamped to keep the active days inside the period
          LEAST(GREATEST(b.period_start, IFNULL(b.plan_start, b.period_start)),
                DATE(TIMESTAMP_SUB(TIMESTAMP(b.period_end), INTERVAL (b.active_days - 1) DAY))) AS first_day,
          CASE
            WHEN REGEXP_CONTAINS(TRIM(b.provider), r'[A-Z]') THEN TRIM(b.provider)
            WHEN LOWER(TRIM(b.provider)) = 'openai' THEN 'OpenAI'
            WHEN LOWER(TRIM(b.provider)) = 'github' THEN 'GitHub'
            WHEN LOWER(TRIM(b.provider)) = 'gitlab' THEN 'GitLab'
            WHEN LOWER(TRIM(b.provider)) = 'hubspot' THEN 'HubSpot'
            WHEN LOWER(TRIM(b.provider)) = 'linkedin' THEN 'LinkedIn'
            WHEN LOWER(TRIM(b.provider)) = 'jetbrains' THEN 'JetBrains'
            WHEN LOWER(TRIM(b.provider)) = 'mongodb' THEN 'MongoDB'
            WHEN LOWER(TRIM(b.provider)) = 'pagerduty' THEN 'PagerDuty'
            WHEN LOWER(TRIM(b.provider)) = 'docusign' THEN 'DocuSign'
            WHEN LOWER(TRIM(b.provider)) = 'clickup' THEN 'ClickUp'
            WHEN LOWER(TRIM(b.provider)) = 'servicenow' THEN 'ServiceNow'
            WHEN LOWER(TRIM(b.provider)) = 'hashicorp' THEN 'HashiCorp'
            WHEN LOWER(TRIM(b.provider)) = 'launchdarkly' THEN 'LaunchDarkly'
            WHEN LOWER(TRIM(b.provider)) = 'elevenlabs' THEN 'ElevenLabs'
            WHEN LOWER(TRIM(b.provider)) = 'chatgpt' THEN 'ChatGPT'
            WHEN LOWER(TRIM(b.provider)) = 'youtube' THEN 'YouTube'
            WHEN LOWER(TRIM(b.provider)) IN ('aws', 'ibm', 'sap', 'gcp') THEN UPPER(TRIM(b.provider))
            ELSE INITCAP(REPLACE(REPLACE(TRIM(b.provider), '_', ' '), '-', ' '))
          END AS provider_name,
          CASE LOWER(TRIM(IFNULL(b.category, '')))
            WHEN 'ai and machine learning' THEN 'AI and Machine Learning'
            WHEN 'analytics' THEN 'Analytics'
            WHEN 'business applications' THEN 'Business Applications'
            WHEN 'compute' THEN 'Compute'
            WHEN 'databases' THEN 'Databases'
            WHEN 'developer tools' THEN 'Developer Tools'
            WHEN 'multicloud' THEN 'Multicloud'
            WHEN 'identity' THEN 'Identity'
            WHEN 'integration' THEN 'Integration'
            WHEN 'internet of things' THEN 'Internet of Things'
            WHEN 'management and governance' THEN 'Management and Governance'
            WHEN 'media' THEN 'Media'
            WHEN 'migration' THEN 'Migration'
            WHEN 'mobile' THEN 'Mobile'
            WHEN 'networking' THEN 'Networking'
            WHEN 'security' THEN 'Security'
            WHEN 'storage' THEN 'Storage'
            WHEN 'web' THEN 'Web'
            ELSE 'Other'
          END AS service_category,
          IF(b.pricing_model = 'per_seat', 'Seat', 'Subscription') AS pricing_unit,
          CONCAT(LOWER(TRIM(b.provider)), '/', b.plan_name, '/', b.pricing_model) AS sku_id
        FROM base AS b
      ),
      units AS (
        -- Integer arithmetic on nano-units, rounding half up. Every DIV and MOD call and every DIV argument
        -- is in parentheses: the emulator drops the grouping of DIV and MOD arguments when it transpiles them.
        -- With pq = period_days x qty and list_nanos = Q x pq + R:
        --   list_unit_nanos = round(list_nanos x active_days over pq) = Q x active_days + round(R x active_days over pq)
        --   list_day_nanos = round(list_nanos over pq) = Q + round(R over pq)
        --   contracted_unit_nanos = round(billed_nanos over qty), contracted_day_nanos = round(charge_nanos over pq)
        SELECT
          x.*,
          (DIV((x.list_nanos), (x.period_days * x.qty))) * x.active_days
            + (DIV((2 * (MOD(x.list_nanos, x.period_days * x.qty)) * x.active_days + x.period_days * x.qty),
                   (2 * x.period_days * x.qty))) AS list_unit_nanos,
          (DIV((x.list_nanos), (x.period_days * x.qty)))
            + (CASE WHEN 2 * (MOD(x.list_nanos, x.period_days * x.qty)) >= x.period_days * x.qty THEN 1 ELSE 0 END)
            AS list_day_nanos,
          (DIV((x.billed_nanos), (x.qty)))
            + (CASE WHEN 2 * (MOD(x.billed_nanos, x.qty)) >= x.qty THEN 1 ELSE 0 END) AS contracted_unit_nanos,
          (DIV((x.charge_nanos), (x.period_days * x.qty)))
            + (CASE WHEN 2 * (MOD(x.charge_nanos, x.period_days * x.qty)) >= x.period_days * x.qty THEN 1 ELSE 0 END)
            AS contracted_day_nanos,
          -- the last active day of the period takes the remainder, like daily_cost in the daily table
          x.cost_date = DATE(TIMESTAMP_ADD(TIMESTAMP(x.first_day), INTERVAL (x.active_days - 1) DAY)) AS is_last_day,
          CONCAT(x.provider_name, ' ', x.plan_name, ' ', REPLACE(x.billing_cycle, '_', '-'), ' subscription, ',
                 IF(x.pricing_model = 'per_seat',
                    CONCAT(CAST(x.qty AS STRING), IF(x.qty = 1, ' seat', ' seats')), 'flat fee')) AS description
        FROM described AS x
      ),
      usage_rows AS (
        SELECT
          u.*,
          'Usage' AS charge_category,
          u.cost_date AS charge_date,
          TIMESTAMP(u.cost_date) AS charge_start,
          TIMESTAMP_ADD(TIMESTAMP(u.cost_date), INTERVAL 1 DAY) AS charge_end,
          CAST(0 AS NUMERIC(38, 9)) AS billed_cost,
          u.daily_cost AS effective_cost,
          -- the day of a per-unit period amount U with daily rate d: d, and U - (active_days - 1) x d on the
          -- last active day, so the active days of a period sum exactly to U
          CASE WHEN u.is_last_day THEN u.list_unit_nanos - (u.active_days - 1) * u.list_day_nanos
               ELSE u.list_day_nanos END AS list_price_nanos,
          CASE WHEN u.is_last_day THEN u.contracted_unit_nanos - (u.active_days - 1) * u.contracted_day_nanos
               ELSE u.contracted_day_nanos END AS contracted_price_nanos,
          CAST(u.qty AS NUMERIC(38, 9)) AS consumed_quantity,
          u.pricing_unit AS consumed_unit,
          CONCAT(u.description, ', amortized share for ', CAST(u.cost_date AS STRING)) AS charge_description
        FROM units AS u
      ),
      purchase_rows AS (
        SELECT
          u.*,
          'Purchase' AS charge_category,
          u.first_day AS charge_date,
          TIMESTAMP(u.first_day) AS charge_start,
          TIMESTAMP_ADD(TIMESTAMP(u.first_day), INTERVAL u.active_days DAY) AS charge_end,
          u.billed_charge AS billed_cost,
          CAST(0 AS NUMERIC(38, 9)) AS effective_cost,
          u.list_unit_nanos AS list_price_nanos,
          u.contracted_unit_nanos AS contracted_price_nanos,
          CAST(NULL AS NUMERIC(38, 9)) AS consumed_quantity,
          CAST(NULL AS STRING) AS consumed_unit,
          CONCAT(u.description, ', service ', CAST(u.first_day AS STRING), ' to ',
                 CAST(DATE(TIMESTAMP_ADD(TIMESTAMP(u.first_day), INTERVAL (u.active_days - 1) DAY)) AS STRING))
            AS charge_description
        FROM (
          SELECT units.*, ROW_NUMBER() OVER (
            PARTITION BY units.subscription_id, units.period_start ORDER BY units.cost_date) AS period_row
          FROM units
        ) AS u
        -- one per billing period, kept when its billing day is in the window
        WHERE u.period_row = 1 AND u.first_day BETWEEN u.window_start AND u.window_end
      ),
      focus_rows AS (
        SELECT
          r.*,
          CAST(r.list_price_nanos AS NUMERIC(38, 9)) * CAST('0.000000001' AS NUMERIC(38, 9)) AS list_unit_price,
          CAST(r.list_price_nanos * r.qty AS NUMERIC(38, 9)) * CAST('0.000000001' AS NUMERIC(38, 9)) AS list_cost,
          CAST(r.contracted_price_nanos AS NUMERIC(38, 9)) * CAST('0.000000001' AS NUMERIC(38, 9))
            AS contracted_unit_price,
          CAST(r.contracted_price_nanos * r.qty AS NUMERIC(38, 9)) * CAST('0.000000001' AS NUMERIC(38, 9))
            AS contracted_cost,
          TIMESTAMP(DATE_TRUNC(r.charge_date, MONTH)) AS billing_period_start,
          TIMESTAMP_ADD(TIMESTAMP(LAST_DAY(r.charge_date, MONTH)), INTERVAL 1 DAY) AS billing_period_end
        FROM (
          SELECT subscription_id, provider, plan_name, currency, billing_cycle, pricing_model, period_start,
                 period_end, contract_id, qty, tags, pipeline_id, run_id, provider_name, service_category,
                 pricing_unit, sku_id, charge_category, charge_date, charge_start, charge_end, billed_cost,
                 effective_cost, list_price_nanos, contracted_price_nanos, consumed_quantity, consumed_unit,
                 charge_description
          FROM usage_rows
          UNION ALL
          SELECT subscription_id, provider, plan_name, currency, billing_cycle, pricing_model, period_start,
                 period_end, contract_id, qty, tags, pipeline_id, run_id, provider_name, service_category,
                 pricing_unit, sku_id, charge_category, charge_date, charge_start, charge_end, billed_cost,
                 effective_cost, list_price_nanos, contracted_price_nanos, consumed_quantity, consumed_unit,
                 charge_description
          FROM purchase_rows
        ) AS r
      )
      SELECT
        CAST(NULL AS STRING) AS AvailabilityZone,
        f.billed_cost AS BilledCost,
        IFNULL(f.contract_id, f.subscription_id) AS BillingAccountId,
        CONCAT(f.provider_name, ' ', IFNULL(f.contract_id, f.subscription_id)) AS BillingAccountName,
        IF(f.contract_id IS NULL, 'Subscription', 'Contract') AS BillingAccountType,
        f.currency AS BillingCurrency,
        f.billing_period_end AS BillingPeriodEnd,
        f.billing_period_start AS BillingPeriodStart,
        CAST(NULL AS STRING) AS CapacityReservationId,
        CAST(NULL AS STRING) AS CapacityReservationStatus,
        f.charge_category AS ChargeCategory,
        CAST(NULL AS STRING) AS ChargeClass,
        f.charge_description AS ChargeDescription,
        'Recurring' AS ChargeFrequency,
        f.charge_end AS ChargePeriodEnd,
        f.charge_start AS ChargePeriodStart,
        CAST(NULL AS STRING) AS CommitmentDiscountCategory,
        CAST(NULL AS STRING) AS CommitmentDiscountId,
        CAST(NULL AS STRING) AS CommitmentDiscountName,
        CAST(NULL AS NUMERIC(38, 9)) AS CommitmentDiscountQuantity,
        CAST(NULL AS STRING) AS CommitmentDiscountStatus,
        CAST(NULL AS STRING) AS CommitmentDiscountType,
        CAST(NULL AS STRING) AS CommitmentDiscountUnit,
        f.consumed_quantity AS ConsumedQuantity,
        f.consumed_unit AS ConsumedUnit,
        f.contracted_cost AS ContractedCost,
        f.contracted_unit_price AS ContractedUnitPrice,
        f.effective_cost AS EffectiveCost,
        CAST(NULL AS STRING) AS InvoiceId,
        f.provider_name AS InvoiceIssuerName,
        f.list_cost AS ListCost,
        f.list_unit_price AS ListUnitPrice,
        'Standard' AS PricingCategory,
        f.currency AS PricingCurrency,
        f.contracted_unit_price AS PricingCurrencyContractedUnitPrice,
        f.effective_cost AS PricingCurrencyEffectiveCost,
        f.list_unit_price AS PricingCurrencyListUnitPrice,
        CAST(f.qty AS NUMERIC(38, 9)) AS PricingQuantity,
        f.pricing_unit AS PricingUnit,
        f.provider_name AS ProviderName,
        f.provider_name AS PublisherName,
        CAST(NULL AS STRING) AS RegionId,
        CAST(NULL AS STRING) AS RegionName,
        CAST(NULL AS STRING) AS ResourceId,
        CAST(NULL AS STRING) AS ResourceName,
        CAST(NULL AS STRING) AS ResourceType,
        f.service_category AS ServiceCategory,
        CONCAT(f.provider_name, ' ', f.plan_name) AS ServiceName,
        CONCAT('Other (', f.service_category, ')') AS ServiceSubcategory,
        f.sku_id AS SkuId,
        IF(f.pricing_model = 'per_seat', 'Seats', 'Subscription') AS SkuMeter,
        JSON_OBJECT('x_BillingCycle', f.billing_cycle, 'x_PricingModel', f.pricing_model) AS SkuPriceDetails,
        CONCAT(f.sku_id, '/', f.billing_cycle, '/', f.currency) AS SkuPriceId,
        f.subscription_id AS SubAccountId,
        CONCAT(f.provider_name, ' ', f.plan_name) AS SubAccountName,
        'Subscription' AS SubAccountType,
        f.tags AS Tags,
        'saas_subscription' AS x_SourceSystem,
        f.charge_date AS x_ChargeDate,
        f.subscription_id AS x_SubscriptionId,
        f.period_start AS x_ServicePeriodStart,
        f.period_end AS x_ServicePeriodEnd,
        f.billing_cycle AS x_BillingCycle,
        f.pricing_model AS x_PricingModel,
        f.pipeline_id AS x_PipelineId,
        f.run_id AS x_RunId,
        CURRENT_TIMESTAMP() AS x_IngestedAt
      FROM focus_rows AS f
    ) AS S
    ON FALSE
    WHEN NOT MATCHED BY SOURCE
      AND T.x_SourceSystem = 'saas_subscription' AND T.x_ChargeDate BETWEEN ? AND ? THEN DELETE
    WHEN NOT MATCHED THEN INSERT (
      AvailabilityZone, BilledCost, BillingAccountId, BillingAccountName, BillingAccountType, BillingCurrency,
      BillingPeriodEnd, BillingPeriodStart, CapacityReservationId, CapacityReservationStatus, ChargeCategory,
      ChargeClass, ChargeDescription, ChargeFrequency, ChargePeriodEnd, ChargePeriodStart,
      CommitmentDiscountCategory, CommitmentDiscountId, CommitmentDiscountName, CommitmentDiscountQuantity,
      CommitmentDiscountStatus, CommitmentDiscountType, CommitmentDiscountUnit, ConsumedQuantity, ConsumedUnit,
      ContractedCost, ContractedUnitPrice, EffectiveCost, InvoiceId, InvoiceIssuerName, ListCost, ListUnitPrice,
      PricingCategory, PricingCurrency, PricingCurrencyContractedUnitPrice, PricingCurrencyEffectiveCost,
      PricingCurrencyListUnitPrice, PricingQuantity, PricingUnit, ProviderName, PublisherName, RegionId,
      RegionName, ResourceId, ResourceName, ResourceType, ServiceCategory, ServiceName, ServiceSubcategory,
      SkuId, SkuMeter, SkuPriceDetails, SkuPriceId, SubAccountId, SubAccountName, SubAccountType, Tags,
      x_SourceSystem, x_ChargeDate, x_SubscriptionId, x_ServicePeriodStart, x_ServicePeriodEnd, x_BillingCycle,
      x_PricingModel, x_PipelineId, x_RunId, x_IngestedAt)
    VALUES (
      S.AvailabilityZone, S.BilledCost, S.BillingAccountId, S.BillingAccountName, S.BillingAccountType,
      S.BillingCurrency, S.BillingPeriodEnd, S.BillingPeriodStart, S.CapacityReservationId,
      S.CapacityReservationStatus, S.ChargeCategory, S.ChargeClass, S.ChargeDescription, S.ChargeFrequency,
      S.ChargePeriodEnd, S.ChargePeriodStart, S.CommitmentDiscountCategory, S.CommitmentDiscountId,
      S.CommitmentDiscountName, S.CommitmentDiscountQuantity, S.CommitmentDiscountStatus,
      S.CommitmentDiscountType, S.CommitmentDiscountUnit, S.ConsumedQuantity, S.ConsumedUnit, S.ContractedCost,
      S.ContractedUnitPrice, S.EffectiveCost, S.InvoiceId, S.InvoiceIssuerName, S.ListCost, S.ListUnitPrice,
      S.PricingCategory, S.PricingCurrency, S.PricingCurrencyContractedUnitPrice, S.PricingCurrencyEffectiveCost,
      S.PricingCurrencyListUnitPrice, S.PricingQuantity, S.PricingUnit, S.ProviderName, S.PublisherName,
      S.RegionId, S.RegionName, S.ResourceId, S.ResourceName, S.ResourceType, S.ServiceCategory, S.ServiceName,
      S.ServiceSubcategory, S.SkuId, S.SkuMeter, S.SkuPriceDetails, S.SkuPriceId, S.SubAccountId,
      S.SubAccountName, S.SubAccountType, S.Tags, S.x_SourceSystem, S.x_ChargeDate, S.x_SubscriptionId,
      S.x_ServicePeriodStart, S.x_ServicePeriodEnd, S.x_BillingCycle, S.x_PricingModel, S.x_PipelineId,
      S.x_RunId, S.x_IngestedAt)
  """, p_dataset, p_dataset, p_dataset)
  USING p_start_date, p_end_date, p_pipeline_id, p_run_id, p_start_date, p_end_date;

  EXECUTE IMMEDIATE FORMAT("""
    SELECT
      ? AS dataset, ? AS start_date, ? AS end_date,
      COUNTIF(ChargeCategory = 'Purchase') AS purchase_rows,
      COUNTIF(ChargeCategory = 'Usage') AS usage_rows,
      CAST(IFNULL(SUM(BilledCost), 0) AS STRING) AS billed_cost,
      CAST(IFNULL(SUM(EffectiveCost), 0) AS STRING) AS effective_cost
    FROM `${project}.%s.cost_data_focus_1_2`
    WHERE x_SourceSystem = 'saas_subscription' AND x_ChargeDate BETWEEN ? AND ?
  """, p_dataset)
  USING p_dataset, p_start_date, p_end_date, p_start_date, p_end_date;
END
