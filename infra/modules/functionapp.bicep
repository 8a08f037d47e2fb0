// The Function App on Flex Consumption (Linux, Python 3.11), running as the user-assigned identity:
// AzureWebJobsStorage, the deployment package, TUNEDROP_STORAGE, Application Insights and the
// webhook secret (Key Vault reference) all authenticate with it. No connection string or key.
//
// `tunedropSettings` below is the one place the app's own settings are set; tests/test_infra.py
// checks it against shared/settings.py (every setting the code reads is here, and nothing else).
// FUNCTIONS_WORKER_RUNTIME / FUNCTIONS_EXTENSION_VERSION / WEBSITE_RUN_FROM_PACKAGE are not set:
// Flex Consumption takes the runtime from functionAppConfig and rejects those settings.
param name string
param location string
param tags object
param identityId string
param identityClientId string
param hostStorageAccountName string
param deploymentContainerUrl string
param dataBlobEndpoint string
param dataQueueEndpoint string
param dataTableEndpoint string
param appInsightsConnectionString string
@description('Versionless Key Vault secret URI of the webhook secret, or empty.')
param webhookSecretUri string
param webhookUrls string
@description('name:sha256 entries of the /api/v1 keys (hashes, not secrets).')
param apiKeys string
param baseModel string
param workspaceId string
param computeName string
param dataContainer string
param datastoreName string
param deploymentInstanceType string
param sweepSchedule string
param trainingContainer string
param quarantineContainer string
param runsTable string
param webhookQueue string
param jobEventsQueue string
param appSettingOverrides object
param instanceMemoryMB int
param maximumInstanceCount int

var tunedropSettings = {
  // Identity-based connection for blobs, queues and the table (the triggers' `connection`).
  TUNEDROP_STORAGE__blobServiceUri: dataBlobEndpoint
  TUNEDROP_STORAGE__queueServiceUri: dataQueueEndpoint
  TUNEDROP_STORAGE__tableServiceUri: dataTableEndpoint
  TUNEDROP_STORAGE__credential: 'managedidentity'
  TUNEDROP_STORAGE__clientId: identityClientId
  TUNEDROP_TRAINING_CONTAINER: trainingContainer
  TUNEDROP_QUARANTINE_CONTAINER: quarantineContainer
  TUNEDROP_RUNS_TABLE: runsTable
  TUNEDROP_WEBHOOK_QUEUE: webhookQueue
  TUNEDROP_JOB_EVENTS_QUEUE: jobEventsQueue
  TUNEDROP_WEBHOOK_URLS: webhookUrls
  TUNEDROP_WEBHOOK_SECRET: empty(webhookSecretUri) ? '' : '@Microsoft.KeyVault(SecretUri=${webhookSecretUri})'
  TUNEDROP_API_KEYS: apiKeys
  TUNEDROP_WEBHOOK_TIMEOUT_S: '10.0'
  TUNEDROP_WEBHOOK_ATTEMPTS: '6'
  TUNEDROP_WEBHOOK_BACKOFF_S: '10.0'
  TUNEDROP_WEBHOOK_ALLOW_PRIVATE: 'False'
  TUNEDROP_BACKEND: 'azureml'
  TUNEDROP_BASE_MODEL: baseModel
  TUNEDROP_STATE_DIR: '/tmp/tunedrop'
  TUNEDROP_MODEL_CACHE: '/tmp/tunedrop/models'
  TUNEDROP_LOCAL_TRAIN_WORKERS: '0'
  MLFLOW_TRACKING_URI: ''
  TUNEDROP_MODEL_NAME: ''
  TUNEDROP_EVENTS_URL: ''
  TUNEDROP_WORKSPACE_ID: workspaceId
  TUNEDROP_SWEEP_SCHEDULE: sweepSchedule
  TUNEDROP_BLOB_TRIGGER_SOURCE: 'EventGrid'
  TUNEDROP_IDLE_MINUTES: '30.0'
  TUNEDROP_JOB_TIMEOUT_MINUTES: '1440.0'
  TUNEDROP_DEPLOY_TIMEOUT_MINUTES: '60.0'
  TUNEDROP_SCORE_TIMEOUT_S: '90.0'
  TUNEDROP_GATE_MARGIN: '0.0'
  TUNEDROP_MIN_EXAMPLES: '10'
  TUNEDROP_MAX_ERRORS: '50'
  TUNEDROP_MAX_LINE_BYTES: '1048576'
  // Limits (README "Limits"): what a dataset, a request or a receiver may make the app do.
  TUNEDROP_MAX_DATASET_BYTES: '2147483648'
  TUNEDROP_MAX_COMPRESSION_RATIO: '100.0'
  TUNEDROP_MAX_EXAMPLES: '1000000'
  TUNEDROP_MAX_TOKENS: '500000000'
  TUNEDROP_MAX_DUPLICATE_SHARE: '0.5'
  TUNEDROP_MAX_ESTIMATED_HOURS: '168.0'
  TUNEDROP_MAX_ESTIMATED_COST: '1000.0'
  TUNEDROP_MAX_EVAL_EXAMPLES: '1000'
  TUNEDROP_MAX_BLOB_NAME_CHARS: '512'
  TUNEDROP_MAX_REQUEST_BYTES: '1048576'
  TUNEDROP_MAX_JSON_DEPTH: '32'
  TUNEDROP_WEBHOOK_ORDER_WAIT_S: '120.0'
  // Read by the local backend's model servers only (Azure ML endpoints keep their own limits).
  TUNEDROP_MAX_NEW_TOKENS: '512'
  TUNEDROP_MAX_PROMPT_TOKENS: '0'
  TUNEDROP_GENERATION_TIMEOUT_S: '80.0'
  TUNEDROP_SERVER_CONCURRENCY: '16'
  TUNEDROP_SERVER_QUEUE: '64'
  TUNEDROP_SERVER_PREFIX_CACHE_TOKENS: '4096'
  TUNEDROP_TRAINING_OVERRIDES: ''
  TUNEDROP_COUNT_TOKENS: 'True'
  TUNEDROP_ESTIMATE_TOKENS_PER_S: '0.0'
  TUNEDROP_ESTIMATE_COST_PER_HOUR: '-1.0'
  TUNEDROP_AZUREML_REGISTRY: 'azureml'
  TUNEDROP_AZUREML_MODEL_LABEL: 'latest'
  TUNEDROP_AZUREML_FINETUNE_COMPUTE: computeName
  TUNEDROP_AZUREML_IMPORT_COMPUTE: ''
  TUNEDROP_AZUREML_PREPROCESS_COMPUTE: ''
  TUNEDROP_AZUREML_EVALUATION_COMPUTE: ''
  TUNEDROP_AZUREML_EXPERIMENT: ''
  TUNEDROP_AZUREML_DATASTORE: datastoreName
  TUNEDROP_AZUREML_DATA_CONTAINER: dataContainer
  TUNEDROP_AZUREML_GPUS_PER_NODE: '0'
  TUNEDROP_AZUREML_INSTANCE_TYPE: deploymentInstanceType
  TUNEDROP_AZUREML_INSTANCE_COUNT: '1'
  TUNEDROP_AZUREML_CLIENT_ID: identityClientId
  TUNEDROP_AZUREML_KEY_TTL_S: '300.0'
}

var platformSettings = {
  AzureWebJobsStorage__accountName: hostStorageAccountName
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  // The same identity's client id for DefaultAzureCredential in azure-ai-ml / azure-identity.
  AZURE_CLIENT_ID: identityClientId
  // HTTP streams (azurefunctions-extensions-http-fastapi): the worker indexes the app at start-up, where it
  // sees the extension and turns streaming on for every HTTP function.
  PYTHON_ENABLE_INIT_INDEXING: '1'
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225: zone redundancy on Flex Consumption exists only in some regions; a single-zone plan keeps the template deployable everywhere Flex is.
  name: 'plan-${name}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: { name: 'FC1', tier: 'FlexConsumption' }
  properties: { reserved: true }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_56: App Service Authentication (EasyAuth) is not supported on Flex Consumption; HTTP functions use function keys and Event Grid endpoints system keys.
  // checkov:skip=CKV_AZURE_17: client certificates would break Event Grid webhook delivery to the blob extension and job_events endpoints.
  // checkov:skip=CKV_AZURE_159: same reason as CKV_AZURE_17 (client certificates required).
  // checkov:skip=CKV_AZURE_221: public network access is needed: Event Grid delivers to public endpoints and there is no VNet in this template.
  // checkov:skip=CKV_AZURE_222: same reason as CKV_AZURE_221.
  // checkov:skip=CKV_AZURE_212: Flex Consumption scales to zero when idle, which is the point here; always-ready instances would bill around the clock.
  // checkov:skip=CKV_AZURE_213: the Functions host has no health route to probe, and Flex Consumption replaces unhealthy instances itself; a probe would also keep an idle app awake.
  name: name
  location: location
  tags: union(tags, { 'azd-service-name': 'api' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${identityId}': {} }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    keyVaultReferenceIdentity: identityId
    publicNetworkAccess: 'Enabled'
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      remoteDebuggingEnabled: false
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: { name: 'python', version: '3.11' }
    }
  }

  resource appsettings 'config' = {
    name: 'appsettings'
    properties: union(platformSettings, tunedropSettings, appSettingOverrides)
  }

  resource basicFtp 'basicPublishingCredentialsPolicies' = {
    name: 'ftp'
    properties: { allow: false }
  }
  resource basicScm 'basicPublishingCredentialsPolicies' = {
    name: 'scm'
    properties: { allow: false }
  }
}

output name string = site.name
output id string = site.id
output defaultHostName string = site.properties.defaultHostName
