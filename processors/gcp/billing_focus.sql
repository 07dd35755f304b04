-- The FOCUS 1.2 rows (x_SourceSystem = 'gcp') converted from some rows of the org's mirror of its Cloud
-- Billing export (gcp_billing_export_raw): two statements that gcp.bq_etl runs inside the run's one
-- transaction script, right after the mirror's changed partitions were swapped. The FOCUS rows in scope
-- are deleted and every mirror row in scope is inserted as one FOCUS row (a commitment fee with money as
-- two), so re-running leaves the same rows and other sources, accounts and partitions are never touched.
-- Scope: by default the changed source partitions (${focus_scope}: x_SourcePartition IN (...) and the
-- billing accounts those partitions held; ${row_scope}: x_source_partition IN (...)): a FOCUS row depends on
-- its own export row only (and gcp_projects for a missing project name), so rebuilding the changed
-- partitions gives the same rows as rebuilding their whole invoice months. Whole invoice months
-- (BillingPeriodStart / x_invoice_month) when FOCUS rows from before x_SourcePartition existed are in scope.
-- ${focus}, ${raw} and ${projects} are validated table references, ${columns} the FOCUS table's column list;
-- the values in the scopes, ${source} (the export's project.dataset.table), ${pipeline_id} and ${run_id} are
-- typed SQL literals (server.warehouse.sql.literal: validated, no quotes or backslashes), not query
-- parameters (bqemulator binds parameters of scripts wrongly).
--
-- Money: the mirror holds the export's FLOAT money as NUMERIC(38, 9) (rounded by BigQuery when copied);
-- every sum here is NUMERIC. "net" = cost + the sum of credits.amount (credits are negative).
-- Invariant (tested): per invoice month, SUM(BilledCost) = SUM(cost + SUM(credits.amount)) of the export,
-- exactly; SUM(EffectiveCost) = SUM(BilledCost) (Google bills commitment fees hourly: nothing is prepaid,
-- a fee's effective cost is on its commitment row of the same hour).
--
-- Column mapping (r = one export row; every row becomes one FOCUS row, and a commitment fee row with money
-- (Purchase) also one "commitment" row that carries its effective cost, since FOCUS wants EffectiveCost = 0
-- on a Purchase):
--   BilledCost            net (credits of every type are folded into their row: CUD, FEE_UTILIZATION_OFFSET,
--                         sustained use, free tier, discounts, promotions; the raw credits stay in the mirror);
--                         0 on the commitment row
--   EffectiveCost         net; 0 on a Purchase row, whose net is on its commitment row: ChargeCategory Usage,
--                         CommitmentDiscountStatus Unused for the new spend model (the fee's net after its
--                         FEE_UTILIZATION_OFFSET credit is the unused commitment) else Used, List/Contracted 0
--   ListCost              cost_at_list (list price, default consumption model), else cost (tax, adjustments)
--   ContractedCost        cost_at_effective_price_default (negotiated price, before commitment discounts),
--                         else cost
--   PricingQuantity       usage.amount_in_pricing_units (Usage and Purchase rows; NULL otherwise)
--   PricingUnit           usage.pricing_unit
--   ConsumedQuantity/Unit usage.amount / usage.unit (Usage rows)
--   ListUnitPrice         ListCost / PricingQuantity, ContractedUnitPrice: ContractedCost / PricingQuantity
--                         (9 decimals; NULL when the quantity is 0 or the row is not Usage/Purchase)
--   ChargeCategory        cost_type tax: Tax; rounding_error: Adjustment; adjustment: Credit for GOODWILL,
--                         SALES_BASED_GOODWILL, SLA_VIOLATION, else Adjustment; regular: Purchase for a
--                         commitment fee (sku.description 'Commitment...' or a FEE_UTILIZATION_OFFSET credit),
--                         else Usage
--   ChargeClass           'Correction' for a correction row (adjustment_info set on a regular row), else NULL
--   ChargeFrequency       Usage: Usage-Based; Purchase: Recurring; others: One-Time
--   ChargePeriodStart/End usage_start_time / usage_end_time (UTC); the billing period when absent
--   BillingPeriodStart/End invoice.month as a month of America/Los_Angeles, converted to UTC (DST-correct:
--                         202603 -> 2026-03-01T08:00Z .. 2026-04-01T07:00Z), never derived from usage times
--   BillingAccountId      billing_account_id; BillingAccountType 'Billing Account'; BillingAccountName NULL
--   SubAccountId/Name     project.id / project.name, else the name in gcp_projects (Resource Manager, written by
--                         gcp.api_extractor); SubAccountType 'Project' (NULL without a project)
--   BillingCurrency, PricingCurrency  currency (all cost columns are in the billing currency)
--   PricingCurrency*      = ListUnitPrice, ContractedUnitPrice, EffectiveCost
--   ProviderName          'Google Cloud'; InvoiceIssuerName 'Google Cloud' (seller_name for THIRD_PARTY_AGENCY)
--   PublisherName         'Google Cloud' (transaction_type GOOGLE or unset), else seller_name
--   ServiceName           service.description; ServiceCategory: a map of Google's service names, else Other;
--                         ServiceSubcategory 'Other (<ServiceCategory>)'
--   SkuId / SkuMeter      sku.id / sku.description; SkuPriceId '<sku.id>/<price.tier_start_amount or 0>'
--   PricingCategory       Usage/Purchase: Committed when a commitment covers the row, else Standard; NULL others
--   CommitmentDiscount*   a resource CUD credit (COMMITTED_USAGE_DISCOUNT): Category Usage; a legacy spend CUD
--                         credit (..._DOLLAR_BASE), the new spend model (subscription.instance_id with a
--                         non-default consumption_model) or a FEE_UTILIZATION_OFFSET fee: Category Spend.
--                         Id = subscription.instance_id, else the credit's id; Type 'Committed Use Discount';
--                         Status 'Used' on Usage rows; Quantity = PricingQuantity (Usage) / Unit = PricingUnit
--   RegionId/RegionName   location.region; AvailabilityZone location.zone
--   ResourceId/Name/Type  resource.global_name / resource.name / the collection of the global name
--                         ('instances'); NULL in a standard export
--   Tags                  x_tags: resource tags over labels over project labels (first key wins)
--   InvoiceId             NULL (the export has no invoice id)
--   CapacityReservation*, SkuPriceDetails, BillingAccountName, CommitmentDiscountName  NULL
--   x_ChargeDate          DATE(ChargePeriodStart); x_BillingCycle 'monthly'; x_PricingModel consumption_model.id
--   x_SourceSystem 'gcp'; x_PipelineId, x_RunId: the run's; x_IngestedAt CURRENT_TIMESTAMP()
--   x_SourcePartition     x_source_partition: the export partition the row came from (the rebuild's key)
--   x_CostSource, x_PriceTableVersion, x_ServiceTier, x_TokenClass, x_ContextWindow  NULL (GenAI columns)
--
-- Emulator traps: NUMERIC casts are NUMERIC(38, 9) (plain NUMERIC keeps 3 decimals on bqemulator).
DELETE FROM ${focus} WHERE x_SourceSystem = 'gcp' AND ${focus_scope};
INSERT INTO ${focus} (${columns})
SELECT ${columns} FROM (
  WITH credited AS (
    -- the credits of a row folded in one pass (one correlated subquery, not one per figure)
    SELECT
      r.*,
      (SELECT AS STRUCT
          SUM(c.amount) AS total,
          COUNTIF(c.type = 'COMMITTED_USAGE_DISCOUNT') AS resource_cud,
          COUNTIF(c.type = 'COMMITTED_USAGE_DISCOUNT_DOLLAR_BASE') AS spend_cud,
          COUNTIF(c.type = 'FEE_UTILIZATION_OFFSET') AS fee_offset,
          MIN(IF(c.type LIKE 'COMMITTED_USAGE_DISCOUNT%', c.id, NULL)) AS cud_credit_id
        FROM UNNEST(r.credits) AS c) AS credit
    FROM ${raw} AS r
    WHERE r.x_source_table = ${source} AND ${row_scope}
  ),
  src AS (
    SELECT
      r.* EXCEPT (credit),
      IFNULL(r.credit.total, CAST(0 AS NUMERIC(38, 9))) AS credit_total,
      IFNULL(r.credit.resource_cud, 0) AS resource_cud,
      IFNULL(r.credit.spend_cud, 0) AS spend_cud,
      IFNULL(r.credit.fee_offset, 0) AS fee_offset,
      r.credit.cud_credit_id AS cud_credit_id,
      TIMESTAMP(PARSE_DATE('%Y%m', r.x_invoice_month), 'America/Los_Angeles') AS period_start,
      TIMESTAMP(DATETIME(DATE_ADD(PARSE_DATE('%Y%m', r.x_invoice_month), INTERVAL 1 MONTH)), 'America/Los_Angeles')
        AS period_end,
      known.name AS known_project_name
    FROM credited AS r
    -- Resource Manager's names (gcp.api_extractor) for rows the export left without one (usage within 24 h
    -- of a project's creation)
    LEFT JOIN (
      SELECT project_id, ANY_VALUE(name) AS name FROM ${projects} GROUP BY project_id
    ) AS known ON known.project_id = r.project.id
  ),
  classified AS (
    SELECT
      s.*,
      s.cost + s.credit_total AS net,
      CASE
        WHEN s.cost_type = 'tax' THEN 'Tax'
        WHEN s.cost_type = 'rounding_error' THEN 'Adjustment'
        WHEN s.cost_type = 'adjustment'
          AND s.adjustment_info.type IN ('GOODWILL', 'SALES_BASED_GOODWILL', 'SLA_VIOLATION') THEN 'Credit'
        WHEN s.cost_type = 'adjustment' THEN 'Adjustment'
        WHEN STARTS_WITH(LOWER(IFNULL(s.sku.description, '')), 'commitment') OR s.fee_offset > 0 THEN 'Purchase'
        ELSE 'Usage'
      END AS category,
      CASE
        WHEN s.resource_cud > 0 THEN 'Usage'
        WHEN s.spend_cud > 0 OR s.fee_offset > 0 THEN 'Spend'
        WHEN s.subscription.instance_id IS NOT NULL
          AND IFNULL(s.consumption_model.description, 'Default') != 'Default' THEN 'Spend'
        ELSE NULL
      END AS cud_category,
      CASE
        WHEN s.service.description IN ('Compute Engine', 'Kubernetes Engine', 'Cloud Run', 'Cloud Run Functions',
          'Cloud Functions', 'App Engine', 'VMware Engine', 'Batch') THEN 'Compute'
        WHEN s.service.description IN ('Cloud Storage', 'Filestore', 'Persistent Disk', 'Backup and DR Service')
          THEN 'Storage'
        WHEN s.service.description IN ('Cloud SQL', 'Cloud Spanner', 'Cloud Bigtable', 'Firestore',
          'Cloud Memorystore for Redis', 'AlloyDB for PostgreSQL', 'Datastore') THEN 'Databases'
        WHEN s.service.description IN ('BigQuery', 'BigQuery Reservation API', 'BigQuery Storage API', 'Dataflow',
          'Dataproc', 'Cloud Composer', 'Looker', 'Pub/Sub Lite', 'Data Catalog') THEN 'Analytics'
        WHEN s.service.description IN ('Vertex AI', 'Cloud Vision API', 'Cloud Natural Language API',
          'Cloud Speech API', 'Cloud Translation API', 'Gemini API', 'Generative Language API') THEN 'AI and Machine Learning'
        WHEN s.service.description IN ('Networking', 'Cloud DNS', 'Cloud CDN', 'Cloud Load Balancing', 'Cloud NAT',
          'Network Intelligence Center', 'Cloud Interconnect', 'Cloud VPN') THEN 'Networking'
        WHEN s.service.description IN ('Cloud Logging', 'Cloud Monitoring', 'Stackdriver Logging',
          'Stackdriver Monitoring', 'Cloud Trace', 'Cloud Deployment Manager') THEN 'Management and Governance'
        WHEN s.service.description IN ('Cloud Key Management Service (KMS)', 'Secret Manager', 'Security Command Center',
          'Cloud Armor', 'Identity Platform', 'Cloud Identity') THEN 'Security'
        WHEN s.service.description IN ('Cloud Pub/Sub', 'Pub/Sub', 'Cloud Tasks', 'Cloud Scheduler', 'Workflows',
          'Eventarc', 'Apigee') THEN 'Integration'
        WHEN s.service.description IN ('Cloud Build', 'Artifact Registry', 'Container Registry', 'Cloud Source Repositories')
          THEN 'Developer Tools'
        ELSE 'Other'
      END AS service_category
    FROM src AS s
  ),
  priced AS (
    SELECT
      c.*,
      IFNULL(c.cost_at_list, c.cost) AS list_cost,
      IFNULL(c.cost_at_effective_price_default, c.cost) AS contracted_cost,
      IF(c.category IN ('Usage', 'Purchase'), c.usage.amount_in_pricing_units, NULL) AS pricing_quantity,
      IF(c.category IN ('Usage', 'Purchase')
        AND c.usage.amount_in_pricing_units IS NOT NULL AND c.usage.amount_in_pricing_units != 0, TRUE, FALSE)
        AS has_quantity,
      IF(c.category IN ('Usage', 'Purchase') AND c.cud_category IS NOT NULL,
        IFNULL(c.subscription.instance_id, c.cud_credit_id), NULL) AS commitment_id,
      IF(c.adjustment_info.id IS NOT NULL AND c.cost_type = 'regular', 'Correction', NULL) AS charge_class,
      IFNULL(c.usage_start_time, c.period_start) AS charge_start,
      IFNULL(c.usage_end_time, c.period_end) AS charge_end
    FROM classified AS c
  ),
  split AS (
    -- A Purchase row (a commitment fee) with money is followed by its effective-cost row (kind 'commitment')
    SELECT q.*, kind
    FROM priced AS q
    CROSS JOIN UNNEST(IF(q.category = 'Purchase' AND q.net != 0, ['charge', 'commitment'], ['charge'])) AS kind
  )
  SELECT
    p.location.zone AS AvailabilityZone,
    IF(p.kind = 'commitment', CAST(0 AS NUMERIC(38, 9)), p.net) AS BilledCost,
    p.billing_account_id AS BillingAccountId,
    CAST(NULL AS STRING) AS BillingAccountName,
    'Billing Account' AS BillingAccountType,
    p.currency AS BillingCurrency,
    p.period_end AS BillingPeriodEnd,
    p.period_start AS BillingPeriodStart,
    CAST(NULL AS STRING) AS CapacityReservationId,
    CAST(NULL AS STRING) AS CapacityReservationStatus,
    IF(p.kind = 'commitment', 'Usage', p.category) AS ChargeCategory,
    IF(p.kind = 'commitment', NULL, p.charge_class) AS ChargeClass,
    -- (no INITCAP: the emulator runs it as a Python function per row)
    CONCAT(IFNULL(p.sku.description, IFNULL(p.adjustment_info.description, CASE p.cost_type
      WHEN 'regular' THEN 'Regular' WHEN 'tax' THEN 'Tax' WHEN 'adjustment' THEN 'Adjustment'
      WHEN 'rounding_error' THEN 'Rounding Error' ELSE p.cost_type END)),
      IF(p.kind = 'commitment', ' (effective cost of the commitment)', '')) AS ChargeDescription,
    CASE IF(p.kind = 'commitment', 'Usage', p.category)
      WHEN 'Usage' THEN 'Usage-Based' WHEN 'Purchase' THEN 'Recurring' ELSE 'One-Time' END AS ChargeFrequency,
    p.charge_end AS ChargePeriodEnd,
    p.charge_start AS ChargePeriodStart,
    IF(p.commitment_id IS NULL, NULL, p.cud_category) AS CommitmentDiscountCategory,
    p.commitment_id AS CommitmentDiscountId,
    CAST(NULL AS STRING) AS CommitmentDiscountName,
    IF(p.commitment_id IS NOT NULL AND (p.category = 'Usage' OR p.kind = 'commitment'), p.pricing_quantity, NULL)
      AS CommitmentDiscountQuantity,
    CASE
      WHEN p.kind = 'commitment' THEN IF(p.fee_offset > 0, 'Unused', 'Used')
      WHEN p.commitment_id IS NOT NULL AND p.category = 'Usage' THEN 'Used'
    END AS CommitmentDiscountStatus,
    IF(p.commitment_id IS NULL, NULL, 'Committed Use Discount') AS CommitmentDiscountType,
    IF(p.commitment_id IS NOT NULL AND (p.category = 'Usage' OR p.kind = 'commitment'), p.usage.pricing_unit, NULL)
      AS CommitmentDiscountUnit,
    IF(p.category = 'Usage' OR p.kind = 'commitment', p.usage.amount, NULL) AS ConsumedQuantity,
    IF(p.category = 'Usage' OR p.kind = 'commitment', p.usage.unit, NULL) AS ConsumedUnit,
    IF(p.kind = 'commitment', CAST(0 AS NUMERIC(38, 9)), p.contracted_cost) AS ContractedCost,
    IF(p.has_quantity, IF(p.kind = 'commitment', CAST(0 AS NUMERIC(38, 9)),
      ROUND(p.contracted_cost / p.pricing_quantity, 9)), NULL) AS ContractedUnitPrice,
    CASE WHEN p.kind = 'commitment' THEN p.net WHEN p.category = 'Purchase' THEN CAST(0 AS NUMERIC(38, 9))
      ELSE p.net END AS EffectiveCost,
    CAST(NULL AS STRING) AS InvoiceId,
    IF(p.transaction_type = 'THIRD_PARTY_AGENCY', IFNULL(p.seller_name, 'Google Cloud'), 'Google Cloud')
      AS InvoiceIssuerName,
    IF(p.kind = 'commitment', CAST(0 AS NUMERIC(38, 9)), p.list_cost) AS ListCost,
    IF(p.has_quantity, IF(p.kind = 'commitment', CAST(0 AS NUMERIC(38, 9)),
      ROUND(p.list_cost / p.pricing_quantity, 9)), NULL) AS ListUnitPrice,
    IF(p.category IN ('Usage', 'Purchase'), IF(p.cud_category IS NULL, 'Standard', 'Committed'), NULL)
      AS PricingCategory,
    p.currency AS PricingCurrency,
    IF(p.has_quantity, IF(p.kind = 'commitment', CAST(0 AS NUMERIC(38, 9)),
      ROUND(p.contracted_cost / p.pricing_quantity, 9)), NULL) AS PricingCurrencyContractedUnitPrice,
    CASE WHEN p.kind = 'commitment' THEN p.net WHEN p.category = 'Purchase' THEN CAST(0 AS NUMERIC(38, 9))
      ELSE p.net END AS PricingCurrencyEffectiveCost,
    IF(p.has_quantity, IF(p.kind = 'commitment', CAST(0 AS NUMERIC(38, 9)),
      ROUND(p.list_cost / p.pricing_quantity, 9)), NULL) AS PricingCurrencyListUnitPrice,
    p.pricing_quantity AS PricingQuantity,
    IF(p.category IN ('Usage', 'Purchase'), p.usage.pricing_unit, NULL) AS PricingUnit,
    'Google Cloud' AS ProviderName,
    IF(p.transaction_type IS NULL OR p.transaction_type = 'GOOGLE', 'Google Cloud', IFNULL(p.seller_name, 'Google Cloud'))
      AS PublisherName,
    p.location.region AS RegionId,
    p.location.region AS RegionName,
    p.resource.global_name AS ResourceId,
    p.resource.name AS ResourceName,
    IF(p.resource.global_name IS NULL, NULL, REGEXP_EXTRACT(p.resource.global_name, r'/([A-Za-z]+)/[^/]+$'))
      AS ResourceType,
    p.service_category AS ServiceCategory,
    IFNULL(p.service.description, 'Google Cloud') AS ServiceName,
    CONCAT('Other (', p.service_category, ')') AS ServiceSubcategory,
    IF(p.category IN ('Usage', 'Purchase'), p.sku.id, NULL) AS SkuId,
    IF(p.category IN ('Usage', 'Purchase'), p.sku.description, NULL) AS SkuMeter,
    CAST(NULL AS JSON) AS SkuPriceDetails,
    IF(p.category IN ('Usage', 'Purchase') AND p.sku.id IS NOT NULL,
      CONCAT(p.sku.id, '/', IFNULL(CAST(p.price.tier_start_amount AS STRING), '0')), NULL) AS SkuPriceId,
    p.project.id AS SubAccountId,
    IFNULL(p.project.name, p.known_project_name) AS SubAccountName,
    IF(p.project.id IS NULL, NULL, 'Project') AS SubAccountType,
    PARSE_JSON(IFNULL(p.x_tags, '{}')) AS Tags,
    'gcp' AS x_SourceSystem,
    DATE(p.charge_start) AS x_ChargeDate,
    CAST(NULL AS STRING) AS x_SubscriptionId,
    CAST(NULL AS DATE) AS x_ServicePeriodStart,
    CAST(NULL AS DATE) AS x_ServicePeriodEnd,
    'monthly' AS x_BillingCycle,
    p.consumption_model.id AS x_PricingModel,
    CAST(NULL AS STRING) AS x_CostSource,
    CAST(NULL AS STRING) AS x_PriceTableVersion,
    CAST(NULL AS STRING) AS x_ServiceTier,
    CAST(NULL AS STRING) AS x_TokenClass,
    CAST(NULL AS STRING) AS x_ContextWindow,
    ${pipeline_id} AS x_PipelineId,
    ${run_id} AS x_RunId,
    CURRENT_TIMESTAMP() AS x_IngestedAt,
    p.x_source_partition AS x_SourcePartition
  FROM split AS p
);
